"""Data in: everything between a REFER root and a WebDataset shard (no Ray, no training)."""
