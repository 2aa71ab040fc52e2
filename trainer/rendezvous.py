"""Where the ranks of a run meet: a free TCP port on this host, for the local launcher's ranks and for a single rank
started without a launcher; a port named by the job attempt, for the nodes of a SLURM job (which cannot ask rank
0's host for a free one). Imports nothing heavy: the launcher uses it without loading torch."""

from __future__ import annotations

import hashlib
import socket

JOB_PORTS = range(20000, 32768)
"""Where a SLURM job's rank 0 listens: below Linux's ephemeral range (32768-60999, ``ip_local_port_range``), so no
outgoing connection on the node can hold the port; submitit's own choice (20000-60000 from the job id) can."""


def free_port() -> int:
    """An unused TCP port on this host."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def job_port(attempt: str) -> int:
    """The port of a job ``attempt`` (job id and restart count: the same string on every task of the attempt). A
    requeued attempt gets another port, so a port something else took on the first node does not fail every retry."""
    digest = int.from_bytes(hashlib.blake2b(attempt.encode(), digest_size=8).digest(), "little")
    return JOB_PORTS[digest % len(JOB_PORTS)]
