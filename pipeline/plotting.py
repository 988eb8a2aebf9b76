"""Matplotlib for files, never for a screen: the one place the Agg backend is chosen.

Jobs run on headless machines (Ray workers, CI, training nodes), where an interactive backend
would fail or hang; pyplot is imported only when a picture is drawn, so that importing a module
that can plot costs nothing to the many runs that never do.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg (file-only) backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, dpi: int = 100) -> Path:
    """Write ``figure`` as ``path`` (creating its directory) and free it: figures left open leak."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path
