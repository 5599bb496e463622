"""The edit in other forms: GGUF, a LoRA adapter, shard-by-shard apply, upload to the hub."""
