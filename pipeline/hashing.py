"""Content identity of input files: what a config records instead of a path, which can move or be reused."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The file's sha256, read in chunks: a SAM checkpoint is gigabytes and need not fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: str | Path) -> str:
    """A file's sha256, or a directory's: the sha256 of its files' relative paths and sha256s, in
    order, so that a model directory (an LLM's config, weights and tokenizer) has one identity."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of named tensors, by name, dtype, shape and bytes: the identity of weights held in
    memory, the same whether they came from a file, a hub snapshot or a seeded random init."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
