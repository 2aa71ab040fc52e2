"""The ``slurm_cluster`` session fixture: a real two-node SLURM on localhost (see slurm_cluster.py)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from tests.cluster.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed, local_slurm_cluster


@contextlib.contextmanager
def _session_environ(env: dict[str, str]) -> Iterator[None]:
    """Apply ``env``'s differences to os.environ (submitit in this process runs sbatch/sacct with it), then undo them.

    Only the changed keys are restored, so variables other fixtures set meanwhile survive.
    """
    changed = {k for k in os.environ if k not in env} | {k for k, v in env.items() if os.environ.get(k) != v}
    saved = {k: os.environ.get(k) for k in changed}
    for key in changed:
        if key in env:
            os.environ[key] = env[key]
        else:
            del os.environ[key]
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        stack.enter_context(_session_environ(cluster.env))
        yield cluster
