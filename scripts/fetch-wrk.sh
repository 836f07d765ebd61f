#!/usr/bin/env bash
# wrk (the HTTP load generator the load bench cross-checks its own client with) is not on PyPI.
# On Debian/Ubuntu, fetch it and its LuaJIT from the distribution's archive into .cache/wrk
# without root (apt-get download + dpkg -x); the bench runs it with LD_LIBRARY_PATH set.
# Elsewhere, or offline, this fails and the bench reports the wrk rows as not measured.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)/.cache/wrk"
if [ -x "$root/usr/bin/wrk" ] || command -v wrk >/dev/null 2>&1; then
    exit 0
fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
    echo "fetch-wrk: no apt-get/dpkg here; install wrk on PATH for the load bench's wrk rows" >&2
    exit 1
}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q wrk libluajit-5.1-2 >/dev/null 2>&1 \
    || apt-get download -q wrk libluajit2-5.1-2 >/dev/null)
mkdir -p "$root"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$root"; done
LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu:$root/usr/lib/aarch64-linux-gnu" \
    "$root/usr/bin/wrk" --version >/dev/null 2>&1 || [ $? -eq 1 ]  # wrk --version exits 1
echo "fetch-wrk: $root/usr/bin/wrk"
