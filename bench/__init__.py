"""Side-by-side benchmarks (``python -m bench.<name>``); results go to ``bench/results/``."""
