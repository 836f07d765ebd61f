"""Generated gRPC modules for indexer.proto (regenerate with scripts/gen-grpc.sh; never edit)."""
