"""Public test kit for kvcache users and backend authors.

* `kvcache.testing.conformance` — `IndexConformance`, the behaviour suite every `Index` backend
  passes (requires pytest; import it from your tests only).
* `kvcache.testing.events` — `merge_removals`, the decoder's removal-run merge as tests state it.
"""
