"""Entry points only: ``svp`` sub-commands, each also runnable as ``python -m jobs.<name>``."""
