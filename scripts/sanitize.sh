#!/usr/bin/env bash
# The C extensions under AddressSanitizer and UndefinedBehaviorSanitizer: builds all four into a
# scratch copy of the package and runs the tests that feed them generated, mutated and random
# input (the decoders read payloads from the network). Any out-of-bounds read, overflow or
# undefined behaviour aborts the run. Needs gcc with libasan/libubsan; takes ~3 minutes.
#
#   scripts/sanitize.sh            (from the repository, after `make test` built the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r src/kvcache "$scratch/"
find "$scratch/kvcache" -name '*.so' -delete
include=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
numpy_include=$("$python" -c "import numpy; print(numpy.get_include())")
suffix=$("$python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
for source in events/_fastdecode.c hashing/_chain.c service/_token_json.c index/_kernels.c; do
  gcc -shared -fPIC -O1 -g -std=c11 -fno-omit-frame-pointer -fsanitize=address,undefined \
    -fno-sanitize-recover=undefined -I"$include" -I"$numpy_include" \
    "$scratch/kvcache/$source" -o "$scratch/kvcache/${source%.c}$suffix"
done
preload="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# kvcache is imported from the scratch copy before pytest puts src/ on the path.
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 LD_PRELOAD="$preload" PYTHONPATH="$scratch" \
  SANITIZED="$scratch" "$python" - <<'EOF'
import os
import sys

import kvcache
import pytest

import kvcache.events._fastdecode
import kvcache.hashing._chain
import kvcache.index._kernels
import kvcache.service._token_json

for module in (
    kvcache.events._fastdecode,
    kvcache.hashing._chain,
    kvcache.index._kernels,
    kvcache.service._token_json,
):
    assert (module.__file__ or "").startswith(os.environ["SANITIZED"]), module
print("sanitized:", kvcache.__file__)
sys.exit(
    pytest.main(
        [
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/property/test_fastdecode_equivalence.py",
            "tests/property/test_chain_kernel.py",
            "tests/property/test_index_stateful.py",
            "tests/unit/service/test_http_token_json.py",
            "tests/unit/events/test_fastdecode.py",
            "tests/unit/events/test_skip_tokens.py",
            "tests/unit/events/test_events_malformed.py",
            "tests/unit/index/test_kernels.py",
            "tests/unit/test_hashing.py",
        ]
    )
)
EOF
