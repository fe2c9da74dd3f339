"""The adapter file (LyCORIS LoHa .safetensors): kohya key names, read/write, metadata, the consumers' key rules,
what a file holds, `inspect` and `merge`."""
