"""Debian packages the tests need (a real SLURM, a real browser), installed with apt when missing and root."""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Daemons and tools live in sbin/bin; a minimal CI PATH may lack sbin."""


INSTALL_LOCK = "/tmp/tests-apt-install.lock"
"""Held while the tests install packages: one install at a time on the machine."""


class Unavailable(Exception):
    """The programs are missing and cannot be installed here (not root, or no apt); the message says how."""


def which(name: str) -> str | None:
    """``name`` on the PATH or in the system directories."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}")


def ensure_programs(programs: Sequence[str], packages: Sequence[str], what: str) -> None:
    """Install ``packages`` when any of ``programs`` is missing (root only). Raises :class:`Unavailable` when they
    cannot be installed here, RuntimeError with apt's output when apt fails."""
    missing = [p for p in programs if which(p) is None]
    if not missing:
        return
    how = f"run the tests as root on Debian/Ubuntu, or `apt-get install {' '.join(packages)}`"
    if os.geteuid() != 0:
        raise Unavailable(f"{what} need {', '.join(missing)} and root; {how}")
    if which("apt-get") is None:
        raise Unavailable(f"{what} need {', '.join(missing)}; no apt-get on this machine to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}"}
    # Another apt (a machine's own updates, a set-up step) may hold dpkg's lock for a while: wait for it; and the
    # two pytest-xdist workers install one after the other (apt's list lock has no wait of its own).
    wait_lock = ["-o", "DPkg::Lock::Timeout=300"]
    with open(INSTALL_LOCK, "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        _install(packages, programs, what, env, wait_lock)


def _install(
    packages: Sequence[str], programs: Sequence[str], what: str, env: dict[str, str], wait_lock: list[str]
) -> None:
    if not [p for p in programs if which(p) is None]:  # the other worker installed them meanwhile
        return
    for cmd in (
        ["apt-get", *wait_lock, "update"],
        ["apt-get", *wait_lock, "install", "-y", "--no-install-recommends", *packages],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(
                f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}; install {' '.join(packages)} "
                f"by hand to run {what}:\n{tail}"
            )
    if still := [p for p in programs if which(p) is None]:
        raise RuntimeError(f"installed {' '.join(packages)} but {', '.join(still)} are still missing")
