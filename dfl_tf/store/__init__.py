"""Embedding store: TFRecord shards and their manifest."""
