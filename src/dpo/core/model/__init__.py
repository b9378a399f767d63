"""The model side: loading (hub, local, GGUF, the tiny test model), log-probabilities of
completions and their speed paths, activation checkpointing, dropout and FLOPs."""
