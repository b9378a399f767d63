"""From files to batches: reading records and picking their format, token ids (truncation,
chat templates, drops), padding into tensors and the deterministic per-rank batch order."""
