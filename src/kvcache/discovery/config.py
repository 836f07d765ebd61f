"""Settings of Kubernetes pod discovery (the `discovery` section of the config tree)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]

PodIdentity = Literal["ip_port", "ip", "name", "namespaced_name"]


class DiscoveryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Watch engine pods and follow them: dial the ready ones, forget the ones that go away."""

    enabled: bool = False
    """Run pod discovery (needs the `k8s` extra and RBAC to get/list/watch pods)."""
    namespace: str = ""
    """Namespace to watch; "" watches every namespace (needs a ClusterRole)."""
    label_selector: str = "llm-d.ai/inference-serving=true"
    """Kubernetes label selector of the engine pods (llm-d's label by default)."""
    socket_port: Port = 5557
    """Port each engine's ZMQ publisher binds (`tcp://*:<port>` in its `--kv-events-config`)."""
    dial: bool = True
    """Connect to every ready pod's publisher. False when engines publish to our bound endpoint
    instead: discovery then only forgets the entries of pods that stop being ready or go."""
    pod_identity: PodIdentity = "ip_port"
    """The pod id engines put in their topic `kv@<pod id>@<model>`, which is also what the scorer
    returns: `ip_port` = `<pod IP>:<identity_port>` (llm-d's guides), `ip` = the pod IP (the
    older helm chart), `name` = the pod name (a topic built from the downward API's POD_NAME),
    `namespaced_name` = `<namespace>/<name>` (pod names repeated across namespaces)."""
    identity_port: Port = 8000
    """The port in `ip_port` identities: the engine's HTTP port, as written in its topic."""
    kubeconfig: str | None = None
    """A kubeconfig file. None: the in-cluster service account when running in a pod, else the
    default kubeconfig (KUBECONFIG or ~/.kube/config)."""
    context: str | None = None
    """The kubeconfig context to use (None: its current context)."""
    resync_seconds: Annotated[float, msgspec.Meta(ge=0.0)] = 300.0
    """Relist every pod this often even when the watch is healthy (0: only when it expires), so
    a missed event is repaired within this bound."""
    watch_timeout_seconds: Annotated[int, msgspec.Meta(ge=1)] = 240
    """Server-side duration of one watch request; the watch then resumes where it stopped."""
    request_timeout_seconds: Annotated[float, msgspec.Meta(gt=0.0)] = 30.0
    """Connect timeout, list timeout, and how long a watch may stay silent beyond its duration
    before the connection is considered dead."""
    retry_seconds: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    """First wait after an API error; it doubles on each further error up to `max_retry_seconds`."""
    max_retry_seconds: Annotated[float, msgspec.Meta(gt=0.0)] = 30.0
    """Longest wait between retries while the API server keeps failing."""
    page_size: Annotated[int, msgspec.Meta(ge=1)] = 500
    """Pods per list page (large fleets are listed in consistent pages)."""
