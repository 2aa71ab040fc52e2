"""A real SLURM 22.05 on localhost for tests: two virtual nodes, slurmdbd accounting on a private mariadb, preemption.

Everything (configs, state, spool, logs, pid files, the database) lives in one temp directory that is removed at the
end. Only root can run it: slurmd, munged and the /etc/hosts entry for the node names need it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.apt import SYSTEM_PATH, Unavailable, ensure_programs, which

APT_PACKAGES = ("slurm-wlm", "munge", "slurmdbd", "mariadb-server")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mariadb-install-db", "sbatch", "sacct")
NODES = ("n1", "n2")
CPUS_PER_NODE = 4  # more than this machine has: slurmd accepts it through SlurmdParameters=config_overrides
START_TIMEOUT_S = 90.0
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
HOSTS_FILE = Path("/etc/hosts")
DB_USER, DB_PASS, DB_NAME = "slurm", "slurm-test", "slurm_acct_db"


SlurmUnavailable = Unavailable
"""SLURM cannot be provided here (not root, or no apt); the message says how to enable it."""


def missing_binaries() -> list[str]:
    """The SLURM, munge and mariadb programs that are not installed."""
    return [b for b in REQUIRED_BINARIES if which(b) is None]


def ensure_installed() -> None:
    """Install the Debian packages when the programs are missing (root only).

    Raises SlurmUnavailable when they are missing and cannot be installed here, RuntimeError when apt fails.
    """
    ensure_programs(REQUIRED_BINARIES, APT_PACKAGES, "SLURM tests")


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail_file(path: Path, lines: int) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"), lines)
    except OSError as e:
        return f"<unreadable: {e}>"


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports; the sockets stay open until all are chosen so no port is picked twice."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str, on_timeout: Callable[[], str]) -> None:
    """Poll ``predicate`` every 0.2 s; on timeout raise with ``on_timeout()`` (log tails) in the message."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}")
        time.sleep(0.2)


@dataclass
class SlurmCluster:
    """A running local SLURM: pass ``env`` to subprocesses (the fixture also puts SLURM_CONF in os.environ)."""

    root: Path
    """Temp directory holding everything; removed at teardown."""
    conf_dir: Path
    """Holds slurm.conf and slurmdbd.conf."""
    cluster_name: str
    nodes: tuple[str, ...] = NODES
    cpus_per_node: int = CPUS_PER_NODE
    partitions: tuple[str, ...] = ("low", "high")
    """``low`` is the default; jobs in ``high`` preempt (requeue) jobs in ``low``."""
    log_files: dict[str, Path] = field(default_factory=dict)

    @property
    def slurm_conf(self) -> Path:
        """The slurm.conf every command and job uses."""
        return self.conf_dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Current os.environ plus SLURM_CONF and sbin on PATH, minus an enclosing job's SLURM_* variables."""
        return slurm_env(self.slurm_conf)

    def run(self, cmd: list[str], check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a SLURM command (``["srun", "-N2", "hostname"]``) with the cluster's env; text output captured."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"`{shlex.join(cmd)}` exited with {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sbatch(self, *args: str) -> str:
        """Submit with ``sbatch --parsable ARGS``; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], check=True).stdout.strip()
        return out.split(";")[0]

    def job_state(self, job_id: str | int) -> str:
        """The job's state word (``COMPLETED``, ``RUNNING``, ...) from sacct, else squeue, else ``UNKNOWN``."""
        acct = self.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
        words = acct.stdout.split()
        if acct.returncode == 0 and words:
            return words[0].rstrip("+")  # "CANCELLED by 0" -> "CANCELLED"; "RUNNING+" marks truncation
        queue = self.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
        words = queue.stdout.split()
        return words[0] if queue.returncode == 0 and words else "UNKNOWN"

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``NodeList``, ...); empty once purged."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)])
        if proc.returncode != 0:
            return {}
        info = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                info[key] = value
        return info

    def wait_state(self, job_id: str | int, states: str | Iterable[str], timeout: float = 60) -> str:
        """Wait until the job reaches one of ``states`` (``job_state`` words); returns the state reached."""
        wanted = {states} if isinstance(states, str) else set(states)
        seen: list[str] = []

        def reached() -> bool:
            state = self.job_state(job_id)
            if not seen or seen[-1] != state:
                seen.append(state)
            return state in wanted

        def report() -> str:
            job = self.run(["scontrol", "show", "job", str(job_id)])
            return f"states seen: {seen}\n{job.stdout}{job.stderr}{self.log_tails()}"

        _wait_until(reached, timeout, f"job {job_id} to reach {sorted(wanted)}", report)
        return seen[-1]

    def node_states(self) -> dict[str, str]:
        """Node name -> long state (``idle``, ``allocated``, ``mixed``, ``down*``, ...)."""
        proc = self.run(["sinfo", "-h", "-N", "-o", "%N %T"])
        return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle (no job left on them)."""
        _wait_until(
            lambda: all(self.node_states().get(n) == "idle" for n in self.nodes),
            timeout,
            f"nodes {', '.join(self.nodes)} to be idle",
            lambda: f"node states: {self.node_states()}{self.log_tails()}",
        )

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every daemon log (and of any daemon's stderr), for error messages."""
        paths = dict(self.log_files)
        # A daemon that dies before opening its log file (a bad conf line) only says why on stderr.
        paths.update({p.name: p for p in sorted(self.root.glob("log/*.out")) if p.stat().st_size})
        return "".join(f"\n--- {name} ({path}) ---\n{_tail_file(path, lines)}" for name, path in paths.items())


class _Daemon:
    """A foreground daemon in its own process group, so stopping it also stops anything it forked."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def check_alive(self, logs: Callable[[], str]) -> None:
        """Raise, with ``logs()`` in the message, if the daemon has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} during start-up\n{logs()}")

    def stop(self, timeout: float = 15) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _slurm_conf(root: Path, name: str, ctld_port: int, dbd_port: int, node_ports: list[int]) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} RealMemory=1000 "
        "State=UNKNOWN"
        for n, p in zip(NODES, node_ports, strict=True)
    )
    node_list = ",".join(NODES)
    return f"""\
ClusterName={name}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after its credential expires (default 120 s + 1).
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: track job processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=100000
# Without it preemption sends only SIGTERM, never the job's --signal (submitit checkpoints on USR2).
SlurmctldParameters=preempt_send_user_signal
# Both slurmd share this machine's hardware; let them claim the CPUs configured here instead.
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# Short waits keep preemption and teardown quick.
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
MessageTimeout=10
{nodes}
PartitionName=low Nodes={node_list} Default=YES PriorityTier=1 PreemptMode=REQUEUE MaxTime=60 State=UP
PartitionName=high Nodes={node_list} PriorityTier=10 MaxTime=60 State=UP
"""


def _slurmdbd_conf(root: Path, dbd_port: int, db_port: int) -> str:
    return f"""\
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={root}/run/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
"""


def slurm_env(conf: Path) -> dict[str, str]:
    """os.environ plus SLURM_CONF and the sbin dirs on PATH, minus variables of an enclosing SLURM job.

    Inherited SLURM_JOB_ID & co. (pytest itself running in a SLURM job) would make srun and sbatch act on that job.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    path = env.get("PATH", "").split(os.pathsep) if env.get("PATH") else []
    env["PATH"] = os.pathsep.join(path + [p for p in SYSTEM_PATH.split(os.pathsep) if p not in path])
    env["SLURM_CONF"] = str(conf)
    return env


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge(stack: contextlib.ExitStack) -> None:
    """Reuse a running munged, else start one (as the munge user, like its service does) and stop it at the end."""
    if _munge_works():
        return
    import grp
    import pwd

    uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(MUNGE_KEY.parent, uid, gid)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        os.chown(MUNGE_KEY, uid, gid)
        MUNGE_KEY.chmod(0o400)
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    os.chown(MUNGE_SOCKET_DIR, uid, gid)
    # --force: a munged killed earlier may have left its socket behind, which would block the start.
    proc = subprocess.run(
        ["runuser", "-u", "munge", "--", which("munged") or "munged", "--force"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"munged failed to start ({proc.returncode}): {proc.stderr.strip()}")
    pid_file = MUNGE_SOCKET_DIR / "munged.pid"

    def stop_munged() -> None:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)

    stack.callback(stop_munged)
    _wait_until(_munge_works, 15, "munged to answer", lambda: "munge -n | unmunge keeps failing")


def _add_hosts_entry(stack: contextlib.ExitStack, tag: str) -> None:
    """Make the node names resolve (submitit's MASTER_ADDR is the first node name); the line is removed at the end."""

    def resolves(name: str) -> bool:
        try:
            socket.gethostbyname(name)
            return True
        except OSError:
            return False

    if all(resolves(n) for n in NODES):
        return
    line = f"127.0.0.1 {' '.join(NODES)}  # {tag}"
    original = HOSTS_FILE.read_text()
    # Write in place: /etc/hosts is often a bind mount that cannot be replaced by a rename.
    HOSTS_FILE.write_text(original + ("" if original.endswith("\n") or not original else "\n") + line + "\n")

    def restore() -> None:
        # Overwrite from the start, then cut the tail: the file is never empty or cut short, even when the
        # process is killed half-way (write_text truncates first: a kill there left /etc/hosts broken).
        current = HOSTS_FILE.read_text().splitlines(keepends=True)
        kept = "".join(x for x in current if x.rstrip("\n") != line).encode()
        with open(HOSTS_FILE, "r+b") as f:
            f.write(kept)
            f.truncate(len(kept))

    stack.callback(restore)


def _start_mariadb(stack: contextlib.ExitStack, root: Path, port: int, log: Path) -> None:
    datadir, sock = root / "mariadb", root / "run" / "mysqld.sock"
    install = subprocess.run(
        [
            which("mariadb-install-db") or "mariadb-install-db",
            "--no-defaults",
            f"--datadir={datadir}",
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if install.returncode != 0:
        raise RuntimeError(f"mariadb-install-db failed:\n{_tail_text(install.stdout + install.stderr, 30)}")
    daemon = _Daemon(
        "mariadbd",
        [
            which("mariadbd") or "mariadbd",
            "--no-defaults",
            f"--datadir={datadir}",
            f"--socket={sock}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            "--user=root",
            f"--pid-file={root / 'run' / 'mariadbd.pid'}",
            f"--log-error={log}",
            "--skip-name-resolve",
            # A throw-away test database: trade durability for a fast slurmdbd schema set-up.
            "--innodb-buffer-pool-size=64M",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--innodb-lock-wait-timeout=900",  # slurmdbd warns below this
        ],
        os.environ.copy(),
        root / "log" / "mariadbd.out",
    )
    stack.callback(daemon.stop)
    client = [which("mariadb") or "mariadb", "--no-defaults", f"--socket={sock}", "-u", "root"]

    def ready() -> bool:
        daemon.check_alive(lambda: _tail_file(log, 20))
        return subprocess.run([*client, "-e", "SELECT 1"], capture_output=True, timeout=10).returncode == 0

    _wait_until(ready, 30, "mariadb to accept connections", lambda: _tail_file(log, 20))
    sql = (
        f"CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}'; "
        f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1';"
    )
    grant = subprocess.run([*client, "-e", sql], capture_output=True, text=True, timeout=30)
    if grant.returncode != 0:
        raise RuntimeError(f"could not create the slurmdbd database user: {grant.stderr.strip()}")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _cancel_all_jobs(cluster: SlurmCluster) -> None:
    """Cancel every job and wait (bounded) for them to leave the nodes, so no job outlives its slurmd."""
    with contextlib.suppress(Exception):
        jobs = cluster.run(["squeue", "-h", "-o", "%i"], timeout=15).stdout.split()
        if jobs:
            cluster.run(["scancel", *jobs], timeout=15)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and cluster.run(["squeue", "-h", "-o", "%i"], timeout=15).stdout.strip():
                time.sleep(0.5)


def _kill_leftover_job_processes(conf: Path) -> None:
    """Kill processes still carrying this cluster's SLURM_CONF (job steps whose slurmd is gone); never ourselves."""
    marker = f"SLURM_CONF={conf}".encode()
    protected = {os.getpid(), os.getppid()}
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) in protected:
            continue
        try:
            if marker in (proc_dir / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@contextlib.contextmanager
def local_slurm_cluster(timeout: float = START_TIMEOUT_S) -> Iterator[SlurmCluster]:
    """Start munge, mariadb, slurmdbd, slurmctld and one slurmd per node; yield when ``srun -N2`` works; stop all.

    Teardown runs in reverse start order and also after a start that failed half-way.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            "the local SLURM cluster needs root (slurmd, munged, /etc/hosts); run the tests as root"
            f" on Debian/Ubuntu (it installs {' '.join(APT_PACKAGES)} itself when missing)"
        )
    ensure_installed()  # raises RuntimeError with apt's output when installing fails
    name = f"ci{uuid.uuid4().hex[:8]}"  # fresh per session: accounting never sees stale job ids
    root = Path(tempfile.mkdtemp(prefix="slurm-"))  # short path: unix socket paths are limited to 108 bytes
    conf_dir = root / "etc"
    for sub in ("etc", "state", "spool", "run", "log"):
        (root / sub).mkdir()
    ctld_port, dbd_port, db_port, *node_ports = _free_ports(3 + len(NODES))
    env = slurm_env(conf_dir / "slurm.conf")
    logs = {
        "mariadbd": root / "log" / "mariadbd.err",
        "slurmdbd": root / "log" / "slurmdbd.log",
        "slurmctld": root / "log" / "slurmctld.log",
        **{f"slurmd {n}": root / "log" / f"slurmd-{n}.log" for n in NODES},
    }
    cluster = SlurmCluster(root=root, conf_dir=conf_dir, cluster_name=name, log_files=logs)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        (conf_dir / "slurm.conf").write_text(_slurm_conf(root, name, ctld_port, dbd_port, node_ports))
        dbd_conf = conf_dir / "slurmdbd.conf"
        dbd_conf.write_text(_slurmdbd_conf(root, dbd_port, db_port))
        dbd_conf.chmod(0o600)  # slurmdbd refuses a conf (it holds the db password) that others can read

        _start_munge(stack)
        _add_hosts_entry(stack, f"tests/cluster {name}")
        _start_mariadb(stack, root, db_port, logs["mariadbd"])

        def start(daemon_name: str, cmd: list[str]) -> _Daemon:
            daemon = _Daemon(daemon_name, cmd, env, root / "log" / f"{daemon_name.replace(' ', '-')}.out")
            stack.callback(daemon.stop)
            return daemon

        def alive_and(daemons: list[_Daemon], predicate: Callable[[], bool]) -> Callable[[], bool]:
            def check() -> bool:
                for d in daemons:
                    d.check_alive(cluster.log_tails)
                return predicate()

            return check

        dbd = start("slurmdbd", ["slurmdbd", "-D"])
        _wait_until(alive_and([dbd], lambda: _port_open(dbd_port)), timeout, "slurmdbd to listen", cluster.log_tails)
        # Register the cluster before slurmctld starts so its first accounting messages are kept.
        cluster.run(["sacctmgr", "-i", "add", "cluster", name], check=True)

        ctld = start("slurmctld", ["slurmctld", "-D"])
        # ExitStack unwinds LIFO, so teardown runs: cancel jobs, stop slurmd, kill stray job processes, stop ctld.
        stack.callback(_kill_leftover_job_processes, conf_dir / "slurm.conf")
        slurmds = [start(f"slurmd {n}", ["slurmd", "-D", "-N", n]) for n in NODES]
        stack.callback(_cancel_all_jobs, cluster)
        idle = alive_and([dbd, ctld, *slurmds], lambda: all(cluster.node_states().get(n) == "idle" for n in NODES))
        _wait_until(idle, timeout, f"nodes {', '.join(NODES)} to be idle", cluster.log_tails)
        probe = cluster.run(["srun", "-N2", "hostname"], timeout=timeout)
        if probe.returncode != 0 or len(probe.stdout.split()) != 2:
            raise RuntimeError(
                f"`srun -N2 hostname` failed ({probe.returncode}): {probe.stdout}{probe.stderr}{cluster.log_tails()}"
            )
        yield cluster
