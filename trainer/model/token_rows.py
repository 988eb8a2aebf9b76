"""The LLM's input embedding and LM head with peft's trained token rows (``[SEG]``), without a copy
of the vocabulary per call.

peft's ``TrainableTokensLayer`` runs its forward on a copy of the whole weight with the trained rows
written in (``index_copy``): for Qwen2.5's 151,936 × 896 embedding that is a 272 MB copy per call
and, in the backward, a dense gradient of the same size, for one trained row; the tied LM head pays
it again. Here the frozen layer runs as it is and only the trained rows are put in (embedding) or
their logits computed apart (head). peft still owns the parameters (their names, init, saving and
merging); what this module computes equals peft's forward, values and gradients
(``tests/test_token_rows.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def frozen_layer(layer: nn.Module) -> nn.Module:
    """The layer that runs: peft's base layer under a token wrapper, else ``layer`` itself (what a
    forward hook that times or watches the embedding or the head goes on)."""
    adapter = getattr(layer, "token_adapter", None)
    return adapter.base_layer if adapter is not None else layer


def _trained_rows(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token ids, their trained rows) of the active adapters of a peft token wrapper; None when
    ``layer`` is none, or its adapters are off or merged into the weight (then the base is right)."""
    adapter = getattr(layer, "token_adapter", None)
    if adapter is None or adapter.disable_adapters or adapter.merged or not adapter.active_adapters:
        return None
    weight = adapter.base_layer.weight
    ids = [index for name in adapter.active_adapters for index in adapter.token_indices[name]]
    rows = torch.cat([adapter.trainable_tokens_delta[name] for name in adapter.active_adapters])
    return torch.tensor(ids, device=weight.device), rows.to(weight)


def embed_tokens(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``layer(ids)`` for an input embedding: the frozen rows looked up, the trained ones put in."""
    base = frozen_layer(layer)
    embeds = base(ids)
    trained = _trained_rows(layer)
    if trained is None:
        return embeds
    token_ids, rows = trained
    hits = ids[..., None] == token_ids  # (..., n): which trained row each position takes, if any
    taken = rows[hits.long().argmax(-1)]
    scale = getattr(base, "embed_scale", None)  # an embedding that scales its rows (Gemma) scales these too
    taken = (taken * scale.to(taken.dtype) if scale is not None else taken).to(embeds.dtype)
    return torch.where(hits.any(-1, keepdim=True), taken, embeds)


def token_logits(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``layer(hidden)`` for an LM head: the frozen head's logits, the trained rows' columns computed apart."""
    logits = frozen_layer(layer)(hidden)
    trained = _trained_rows(layer)
    if trained is None:
        return logits
    token_ids, rows = trained
    return logits.index_copy(-1, token_ids, F.linear(hidden, rows).to(logits.dtype))
