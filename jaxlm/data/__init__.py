"""Data, from raw text to batches: corpora, tokenizers, packing, prepared shards, mixtures and instruction data."""
