{{/* Names and labels. */}}
{{- define "kvcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvcache.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: kv-cache-index
{{- end -}}

{{- define "kvcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kvcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvcache.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The kvcache config file: .Values.config with the listening ports the chart owns filled in.
Fails on settings a deployment cannot work with.
*/}}
{{- define "kvcache.config" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $http := deepCopy (get $config "http" | default dict) -}}
{{- if hasKey $http "port" -}}
{{- fail "config.http.port is set by the chart from ports.http; set ports.http instead" -}}
{{- end -}}
{{- $_ := set $http "port" (int .Values.ports.http) -}}
{{- $_ := set $config "http" $http -}}
{{- $events := deepCopy (get $config "events" | default dict) -}}
{{- if hasKey $events "zmq_bind" -}}
{{- fail "config.events.zmq_bind is set by the chart from ports.zmq; set ports.zmq instead" -}}
{{- end -}}
{{- $_ := set $events "zmq_bind" (list (printf "tcp://*:%d" (int .Values.ports.zmq))) -}}
{{- $_ := set $config "events" $events -}}
{{- $grpc := deepCopy (get $config "grpc" | default dict) -}}
{{- if or (hasKey $grpc "port") (hasKey $grpc "host") -}}
{{- fail "config.grpc.port/host are set by the chart from ports.grpc; set ports.grpc instead" -}}
{{- end -}}
{{- if not (kindIs "invalid" .Values.ports.grpc) -}}
{{- $_ := set $grpc "port" (int .Values.ports.grpc) -}}
{{- $_ := set $grpc "host" "0.0.0.0" -}}
{{- $_ := set $config "grpc" $grpc -}}
{{- end -}}
{{- $hashing := deepCopy (get $config "hashing" | default dict) -}}
{{- if and (hasKey $hashing "seed") (not (kindIs "invalid" (get $hashing "seed"))) -}}
{{- /* PYTHONHASHSEED is a string; YAML reads `seed: 42` as a number. */ -}}
{{- $_ := set $hashing "seed" (toString (get $hashing "seed")) -}}
{{- $_ := set $config "hashing" $hashing -}}
{{- end -}}
{{- $index := get $config "index" | default dict -}}
{{- $backend := get $index "backend" | default "memory" -}}
{{- if and (gt (int .Values.replicaCount) 1) (ne $backend "redis") -}}
{{- fail (printf "replicaCount %d needs config.index.backend \"redis\": with the %s index each replica would see only the events of the engines routed to it" (int .Values.replicaCount) $backend) -}}
{{- end -}}
{{- toPrettyJson $config -}}
{{- end -}}

{{/*
The engine-side hashing settings that make vLLM's block hashes kvcache's keys (identity mode),
derived from config.hashing with the same defaults as kvcache's HashingConfig. Returns a dict
{algo, seed (string or ""), blockSize} as JSON.
*/}}
{{- define "kvcache.vllmHashing" -}}
{{- $hashing := get (.Values.config | default dict) "hashing" | default dict -}}
{{- $scheme := get $hashing "scheme" | default "sha256" -}}
{{- if not (has $scheme (list "sha256" "sha256_cbor" "xxhash" "xxhash_cbor")) -}}
{{- fail (printf "vllmExample: config.hashing.scheme %q is not a vLLM --prefix-caching-hash-algo (sha256, sha256_cbor, xxhash, xxhash_cbor)" $scheme) -}}
{{- end -}}
{{- $hasSeed := and (hasKey $hashing "seed") (not (kindIs "invalid" (get $hashing "seed"))) -}}
{{- $seed := "" -}}
{{- if $hasSeed -}}
{{- $seed = toString (get $hashing "seed") -}}
{{- end -}}
{{- if and $hasSeed (eq $seed "") -}}
{{- fail "vllmExample: config.hashing.seed is empty; an empty PYTHONHASHSEED is unset (use null)" -}}
{{- end -}}
{{- if and (hasPrefix "xxhash" $scheme) (not $hasSeed) -}}
{{- fail (printf "vllmExample: config.hashing.seed is required with %s (vLLM seeds it randomly per process otherwise)" $scheme) -}}
{{- end -}}
{{- dict "algo" $scheme "seed" $seed "hasSeed" $hasSeed "blockSize" (int (get $hashing "block_size" | default 16)) | toJson -}}
{{- end -}}

{{- define "kvcache.vllmExampleLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: vllm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: vllm-example
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
