"""The ``slurm_cluster`` session fixture: a real two-node SLURM on localhost (see tests/support/slurm.py)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from tests.support.env import patched_environ
from tests.support.slurm import SlurmCluster, SlurmUnavailable, ensure_installed, local_slurm_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real SLURM with nodes n1, n2 (4 CPUs each), partitions ``low`` (default) and ``high`` (preempts low).

    Skipped when not root and SLURM is missing; as root it installs SLURM with apt and fails if that fails.
    """
    if os.geteuid() == 0:
        try:
            ensure_installed()
        except RuntimeError as e:
            pytest.fail(str(e), pytrace=False)
    with contextlib.ExitStack() as stack:
        start = time.monotonic()
        try:
            cluster = stack.enter_context(local_slurm_cluster())
        except SlurmUnavailable as e:
            pytest.skip(str(e))
        print(f"\nlocal SLURM cluster {cluster.cluster_name} up in {time.monotonic() - start:.1f} s at {cluster.root}")
        stack.enter_context(patched_environ(cluster.env))
        yield cluster
