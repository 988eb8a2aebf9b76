"""The optimizer a run steps its trained parameters with: ``adamw`` or ``adamw8bit``.

AdamW keeps two float32 moments per trained parameter, so a checkpoint (trained weights plus
optimizer state) costs 12 bytes per trained parameter: 197 MB for the 16.4 M that a real-size
``svp`` run trains (Qwen2.5-0.5B, DINOv2-base, SAM ViT-B; 99.5 MB with 8-bit moments, measured
by ``bench.realsize``). bitsandbytes' block-wise 8-bit AdamW (what Hugging Face's Trainer offers
as ``adamw_bnb_8bit``) keeps each moment in one byte plus a float32 scale per block of 256, for
every tensor of 4096 values or more (smaller ones keep float32 moments), so the same checkpoint
costs about 6 bytes per parameter and the optimizer's memory a quarter. The update still runs in
float32; only the stored moments are quantised, and they are the optimizer's own state, so a
resumed run continues exactly as the uninterrupted one.

bitsandbytes is an optional dependency (``pip install 'svp[optim8bit]'``), and one that is costly
to import: it loads its native library and, on CPUs with AVX-512 bf16, asks the Hugging Face hub
for a 4-bit CPU kernel, a network request at import. svp imports it only when a run asks for
``adamw8bit``; until then :func:`keep_bitsandbytes_out` (run by ``import trainer``) keeps the
libraries that would import it by themselves wherever it is installed (peft, as it loads and as
it builds LoRA layers) from doing so.
"""

from __future__ import annotations

import logging
import sys

import torch

from pipeline.errors import SvpError

OPTIMIZERS = ("adamw", "adamw8bit")
_BITSANDBYTES = "bitsandbytes"


class OptimizerError(SvpError):
    """An optimizer that cannot be built here (an unknown name, a missing optional dependency)."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class ``--optimizer name`` builds (both take AdamW's ``lr``, ``betas``, ``weight_decay``), or
    why it cannot be built here: a run asks before it starts any work."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        _let_bitsandbytes_in()
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError as exc:
            raise OptimizerError("--optimizer adamw8bit needs bitsandbytes: pip install 'svp[optim8bit]' "
                                 f"({exc})") from None
        return AdamW8bit
    raise OptimizerError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def keep_bitsandbytes_out() -> None:
    """Make bitsandbytes look not installed to every library, until :func:`optimizer_class` is asked
    for ``adamw8bit``.

    peft imports bitsandbytes opportunistically: ``peft.helpers`` as peft loads, its LoRA dispatch
    as each model is built, whenever ``importlib.util.find_spec`` finds it. A ``None`` entry in
    ``sys.modules`` is Python's own mark of a module that is not available: ``import bitsandbytes``
    then raises ImportError and ``find_spec`` returns None, which is what peft, transformers and
    accelerate check before they use it, so they carry on without it as where it is not installed.
    A process that has imported bitsandbytes already keeps it; code that imports ``trainer`` and
    then wants bitsandbytes for itself builds the ``adamw8bit`` optimizer first or imports it before.
    """
    sys.modules.setdefault(_BITSANDBYTES, None)


def _let_bitsandbytes_in() -> None:
    """Undo :func:`keep_bitsandbytes_out`: a run asked for ``adamw8bit``.

    Its import then warns, on CPUs with AVX-512 bf16, that it could not fetch a 4-bit CPU GEMM
    kernel from the Hugging Face hub. svp runs no 4-bit GEMM, and a line about a missing kernel in
    the run's output would read as a fault: that one message is dropped, every other one kept."""
    if _BITSANDBYTES in sys.modules and sys.modules[_BITSANDBYTES] is None:
        del sys.modules[_BITSANDBYTES]
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_about_gemm_4bit)


def _not_about_gemm_4bit(record: logging.LogRecord) -> bool:
    return "gemm_4bit" not in record.getMessage()
