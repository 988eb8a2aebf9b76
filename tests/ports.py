"""A free TCP port for a server or a launcher a test starts (a fixed one collides with whatever else runs)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
