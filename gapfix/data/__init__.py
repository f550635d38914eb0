"""Data: JSONL loaders, prompt masking, padding/packing and the bundled synthetic math task."""
