#!/usr/bin/env bash
# Regenerate the gRPC modules of src/kvcache/service/proto/indexer.proto.
#
#   scripts/gen-grpc.sh [OUT_DIR]      # default: src (writes beside the .proto)
#
# Needs the pinned grpcio-tools and mypy-protobuf of the `test` extra (the output depends on
# their versions; tests/unit/service/test_grpc_stubs_fresh.py checks the checked-in files).
# PYTHON picks the interpreter (default: .venv/bin/python).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(mkdir -p "${1:-$root/src}" && cd "${1:-$root/src}" && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
# protoc finds plugins by executable path: mypy-protobuf's lives in the interpreter's scripts dir.
scripts="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"

cd "$root/src"
# Relative paths under -I src make the generated imports absolute (kvcache.service.proto...).
# mypy-protobuf reports each file it writes on stderr: show stderr only when protoc fails.
if ! log="$("$python" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" \
  --plugin=protoc-gen-mypy="$scripts/protoc-gen-mypy" --mypy_out="$out" \
  --plugin=protoc-gen-mypy_grpc="$scripts/protoc-gen-mypy_grpc" --mypy_grpc_out="$out" \
  kvcache/service/proto/indexer.proto 2>&1)"; then
  echo "$log" >&2
  exit 1
fi
