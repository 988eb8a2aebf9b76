"""The model: vision encoder, visual projectors, MLLM with token splicing, SAM mask head and losses."""
