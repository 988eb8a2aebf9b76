"""Content identity of input files: what a config records instead of a path, which can move or be reused."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The file's sha256, read in chunks: a SAM checkpoint is gigabytes and need not fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
