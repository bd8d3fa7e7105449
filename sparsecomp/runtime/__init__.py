"""State kept beside the KV cache for decoding (label cache, page min/max)."""
