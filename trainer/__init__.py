"""Model and training loop that stream the shards written by :mod:`pipeline` (see DESIGN §2)."""
