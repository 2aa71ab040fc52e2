"""Where the ranks of a run meet: a free TCP port on this host, for the local launcher's ranks and for a single rank
started without a launcher. Imports nothing heavy: the launcher uses it without loading torch."""

from __future__ import annotations

import socket


def free_port() -> int:
    """An unused TCP port on this host."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
