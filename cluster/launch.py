"""Launch a named config: ``python cluster/launch.py --config NAME [--nodes N] [--local] [--dry-run] [k=v ...]``.

On a machine with SLURM the job is submitted through submitit (one task per GPU, requeued on preemption); without
SLURM (a laptop, CI) or with ``--local`` it runs here with the same code. Re-running the same command on the same
run directory resumes the run. ``--dry-run`` prints the plan (batch, lr, steps, memory per device, sbatch options).
``--chain NAME [--chain NAME ...]`` submits later stages as dependent jobs, each reading the previous run's export.
``--payoff NAME`` runs a fine-tuning or linear-probe config twice after a pretraining run, from its export and from
random weights, and the summary shows what pretraining bought (docs/transfer.md).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import ConfigError, PretrainConfig, TrainConfig, check_runnable, load_config
from trainer.observability.tracking import default_tracking_uri, redact, redacted_yaml
from trainer.resilience.failure import leave
from trainer.resilience.run_lock import RunDirLocked, RunLock
from trainer.run_dir import RunDir, prepare_run_dir

if TYPE_CHECKING:
    from trainer.stages.continuation import InitWeights

log = logging.getLogger("launch")

PING_TIMEOUT_S = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name in configs/ (e.g. huge_fcmae) or a YAML path")
    parser.add_argument(
        "--nodes", type=node_range, metavar="N|MIN-MAX",
        help="nodes (cluster.nodes), or a range the job may start on (cluster.min_nodes-cluster.nodes): the run "
        "keeps the global batch on any count of it by accumulating",
    )  # fmt: skip
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (cluster.gpus_per_node)")
    parser.add_argument("--partition", help="SLURM partition (cluster.partition)")
    parser.add_argument("--account", help="SLURM account (cluster.account)")
    parser.add_argument("--time", type=int, dest="time_min", help="time limit in minutes (cluster.time_min)")
    parser.add_argument(
        "--run-dir", type=Path,
        help="run directory (default: runs/<config name>); later stages of a chain go beside it, named by config",
    )  # fmt: skip
    parser.add_argument("--local", action="store_true", help="run on this machine instead of submitting to SLURM")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print the plan only")
    parser.add_argument(
        "--chain", action="append", default=[], metavar="NAME",
        help="a later stage's config, submitted after this one with model.pretrained set to this run's export",
    )  # fmt: skip
    parser.add_argument(
        "--payoff", metavar="NAME",
        help="a fine-tuning or linear-probe config run twice after the first (pretraining) stage: from its export "
        "and from random weights (in <name>-random); the summary adds the pair's top-1 and their difference",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.base_lr=3e-4")
    return parser.parse_intermixed_args(argv)


def node_range(text: str) -> tuple[int | None, int]:
    """``--nodes``: ``16`` (exactly) or ``12-16`` (min-max) as (min_nodes or None, nodes)."""
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a node count (16) or a range (12-16)") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: counts from 1, the smaller first (12-16)")
    return (lo if sep else None), hi


def cluster_overrides(args: argparse.Namespace) -> list[str]:
    """Command-line flags as config overrides."""
    if args.nodes is not None:
        low, high = args.nodes
        nodes = [f"cluster.nodes={high}", f"cluster.min_nodes={'null' if low is None else low}"]
    else:
        nodes = []
    flags = {
        "gpus_per_node": args.gpus_per_node,
        "partition": args.partition,
        "account": args.account,
        "time_min": args.time_min,
    }
    return nodes + [f"cluster.{k}={v}" for k, v in flags.items() if v is not None]


def slurm_status() -> str | None:
    """None when a SLURM controller answers here (``sbatch`` installed and ``scontrol ping`` succeeds, configless
    clusters included); otherwise why not."""
    if shutil.which("sbatch") is None:
        return "sbatch is not installed on this machine"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=PING_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`scontrol ping` did not answer ({err})"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"`scontrol ping` found no controller: {(ping.stdout + ping.stderr).strip() or ping.returncode}"
    return None


def local_world_size(cfg: TrainConfig) -> int:
    """Ranks of a local run: the CPU ranks of the whole cluster section, or this machine's GPUs."""
    if cfg.cluster.gpus_per_node == 0:
        return cfg.world_size()
    import torch

    return max(1, min(cfg.cluster.gpus_per_node, torch.cuda.device_count()))


def _local_device(cfg: TrainConfig) -> str:
    if cfg.cluster.gpus_per_node == 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve(name: str, args: argparse.Namespace, extra: list[str]) -> TrainConfig:
    return load_config(name, [*cluster_overrides(args), *extra])


def _check(cfg: TrainConfig, local: bool) -> None:
    """Every rule that depends on where the run goes, before anything is built or written."""
    if not local:
        warning = cfg.check_node_range()  # every node count SLURM may start the job on
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        check_runnable(cfg, cfg.world_size(), "cuda" if cfg.cluster.gpus_per_node else "cpu")
        return
    world, device = local_world_size(cfg), _local_device(cfg)
    if world != cfg.world_size():
        c = cfg.cluster
        asked = f"{c.nodes} node(s) x {c.ranks_per_node} {'GPUs' if c.gpus_per_node else 'ranks'}"
        log.warning("--local: %s runs %d %s rank(s) on this machine instead of %d (%s)",
                    cfg.name, world, device.upper(), cfg.world_size(), asked)  # fmt: skip
    check_runnable(cfg, world, device)


def _index_data(cfg: TrainConfig, run_dir: Path) -> None:
    """Index the shards of ``data.train_url`` (and ``val_url`` for the stages that read it) that came without a
    manifest, once, here: cached beside the shards, or in the run directory's ``index/`` when that is not writable,
    where every rank finds it (:func:`data.manifest.find_manifest`)."""
    from data.index_shards import ensure_indexes

    specs = [cfg.data.train_url]
    if cfg.data.val_url:  # pretraining reads it only for its kNN probe, with the bank
        specs.append(cfg.data.val_url)
    bank = getattr(cfg.eval, "knn_bank_url", None)
    if bank:
        specs.append(bank)
    for spec in specs:
        if not spec:
            continue
        try:
            ensure_indexes(spec, str(RunDir(run_dir).index))
        except (OSError, ValueError):
            raise
        except Exception as exc:  # the storage client's own errors (bad bucket names, credentials, ...)
            raise OSError(f"cannot read {spec}: {type(exc).__name__}: {exc}") from exc


def _print_config(cfg: TrainConfig, run_dir: Path) -> None:
    """The resolved config, secrets redacted (it reaches consoles and SLURM logs)."""
    print(f"# resolved config {cfg.name} (run dir {run_dir})\n{redacted_yaml(cfg.model_dump(mode='json'))}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        stages = plan_stages(args)
        configs: list[tuple[TrainConfig, Path]] = []
        inits: dict[Path, InitWeights] = {}
        home = args.run_dir.parent if args.run_dir else Path("runs")
        for i, stage in enumerate(stages):
            extra = list(stage.overrides)
            if stage.upstream is not None:
                extra.append(f"model.pretrained={configs[stage.upstream][1] / 'export' / 'model.safetensors'}")
            if stage.baseline_of is not None:
                extra += ["model.pretrained=null", f"tracking.baseline_of={configs[stage.baseline_of][1]}"]
            cfg = _resolve(stage.name, args, extra)
            run_dir = (args.run_dir if i == 0 and args.run_dir else home / f"{cfg.name}{stage.suffix}").resolve()
            if any(run_dir == other for _, other in configs):
                raise ConfigError(f"two stages of this command would share the run directory {run_dir}")
            _check(cfg, local=args.local)
            _check_payoff(cfg, stage, configs)
            init = _check_init(cfg, run_dir)
            if init is not None:
                inits[run_dir] = init
            configs.append((cfg, run_dir))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    if args.dry_run:
        from cluster.plan import format_plan, make_plan

        for cfg, run_dir in configs:
            _print_config(cfg, run_dir)
            try:
                plan = make_plan(cfg, run_dir)
            except ConfigError as err:
                print(f"config error: {err}", file=sys.stderr)
                return 2
            print(format_plan(cfg, plan), flush=True)
            if isinstance(cfg, PretrainConfig) and cfg.model.init_from:
                what = inits[run_dir].describe() if run_dir in inits else f"converted already in {run_dir}/init"
                print(f"  init from         {what}", flush=True)
        return 0

    if not args.local:
        why = slurm_status()
        if why is not None:
            print(
                f"no SLURM cluster here: {why}.\n"
                f"  run on this machine:  python cluster/launch.py --config {args.config} --local ...\n"
                f"  see the plan only:    python cluster/launch.py --config {args.config} --dry-run ...",
                file=sys.stderr,
            )
            return 2
    locks: list[RunLock] = []
    try:
        for _, run_dir in configs:
            if args.local:  # held by this process until the ranks are gone
                lock = RunLock(run_dir)
                lock.acquire()
                locks.append(lock)
            else:  # the job takes it when it starts; refuse now if a live run or a queued job has the directory
                from cluster.slurm import check_no_job_queued

                RunLock(run_dir).check_free()
                check_no_job_queued(run_dir)
        return _launch(args, stages, configs, locks, inits)
    except RunDirLocked as err:
        print(f"run directory error: {err}", file=sys.stderr)
        return 2
    finally:
        for lock in locks:
            lock.release()


@dataclass(frozen=True)
class Stage:
    """One run of a launch: a config with its overrides, and which earlier stage it starts from (its export as
    ``model.pretrained``) or is the random-weights baseline of."""

    name: str
    overrides: list[str]
    upstream: int | None = None
    baseline_of: int | None = None
    suffix: str = ""  # added to the config's name for its run directory

    @property
    def after(self) -> int | None:
        """The stage whose job this one's waits for (a baseline waits for its pair, which MLflow links it to)."""
        return self.upstream if self.baseline_of is None else self.baseline_of


def plan_stages(args: argparse.Namespace) -> list[Stage]:
    """The command's stages: the config, each ``--chain`` stage reading the previous one's export, then the
    ``--payoff`` pair (from the first stage's export, and from random weights)."""
    stages = [Stage(args.config, list(args.overrides))]
    stages += [Stage(name, [], upstream=i) for i, name in enumerate(args.chain)]
    if args.payoff:
        stages.append(Stage(args.payoff, [], upstream=0))
        stages.append(Stage(args.payoff, [], baseline_of=len(stages) - 1, suffix="-random"))
    return stages


def payoff_pair(stages: list[Stage]) -> tuple[int, int] | None:
    """The positions of the ``--payoff`` pair (pretrained, random) among the stages, if any."""
    return next(((s.baseline_of, i) for i, s in enumerate(stages) if s.baseline_of is not None), None)


def _check_payoff(cfg: TrainConfig, stage: Stage, earlier: list[tuple[TrainConfig, Path]]) -> None:
    """``--payoff`` compares a classifier's top-1 from a pretraining run's encoder and from random weights."""
    if stage.baseline_of is None:
        return
    if earlier[0][0].stage != "pretrain":
        raise ConfigError(
            f"--payoff {stage.name}: the first stage must be a pretraining run, not {earlier[0][0].stage}"
        )
    if cfg.stage != "finetune":
        raise ConfigError(f"--payoff {stage.name}: a fine-tuning or linear-probe config, not a {cfg.stage} one")


def _check_init(cfg: TrainConfig, run_dir: Path) -> InitWeights | None:
    """A pretraining run's ``model.init_from``, read, converted and checked against the model before anything is
    written (None: no source, or the run directory holds its conversion already)."""
    if not isinstance(cfg, PretrainConfig) or not cfg.model.init_from:
        return None
    from trainer.stages.continuation import cached_source, load_init
    from trainer.stages.pretrained import PretrainedWeightsError

    if cached_source(run_dir) == cfg.model.init_from:
        return None
    try:
        return load_init(cfg)
    except PretrainedWeightsError as err:
        raise ConfigError(str(err)) from err


def _launch(
    args: argparse.Namespace,
    stages: list[Stage],
    configs: list[tuple[TrainConfig, Path]],
    locks: list[RunLock],
    inits: dict[Path, InitWeights],
) -> int:
    """Index the data, store the configs and the converted ``model.init_from``, then run here or submit (the run
    directories are locked)."""
    for cfg, run_dir in configs:
        try:
            _index_data(cfg, run_dir)
        except (OSError, ValueError) as err:
            print(f"data error: {err}", file=sys.stderr)
            return 2
    for cfg, run_dir in configs:
        _print_config(cfg, run_dir)
        try:
            if prepare_run_dir(cfg, run_dir):
                log.info("run directory exists: resuming %s", run_dir)
            if run_dir in inits:
                from trainer.stages.continuation import prepare_init

                prepare_init(run_dir, inits[run_dir])
                log.info("model.init_from: %s (converted into %s)", inits[run_dir].describe(), run_dir / "init")
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
    sys.stdout.flush()
    if not args.local:
        return _submit_all(stages, configs)
    from cluster.local import run_local

    walls: list[float] = []
    for (cfg, run_dir), lock in zip(configs, locks, strict=True):
        started = time.perf_counter()
        code = run_local(run_dir, local_world_size(cfg), _local_device(cfg), lock)
        walls.append(time.perf_counter() - started)
        if code != 0:
            return code
    from cluster.summary import summary_table

    print(f"\n{summary_table(configs, walls, payoff_pair(stages))}")
    uri = default_tracking_uri(configs[0][1], configs[0][0].tracking.tracking_uri)
    shown = redact("uri", uri)
    print(f"\nMLflow UI: {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {shown}", flush=True)
    page = training_view(uri, configs[0][0].tracking.experiment)
    if page:
        print(f"then open {page}", flush=True)
    return 0


def training_view(uri: str, experiment: str) -> str | None:
    """The experiment's page in the MLflow UI's model-training view: MLflow 3.17's UI opens its GenAI view unless
    the page's URL asks for ``workflowType=machine_learning`` (it reads that before the experiment's kind tag). A
    server URI gives its own address; a file store the address of ``mlflow ui``."""
    from mlflow.tracking import MlflowClient  # here: at the end of a local chain, never at start-up

    try:
        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception as err:  # the store or server may be gone by now: the hint is not worth a failure
        log.warning("could not look up MLflow experiment %r: %s", experiment, err)
        return None
    if found is None:
        return None
    base = redact("uri", uri) if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{found.experiment_id}?workflowType=machine_learning"


def _submit_all(stages: list[Stage], configs: list[tuple[TrainConfig, Path]]) -> int:
    from cluster.slurm import submit

    jobs: list[str] = []
    for stage, (cfg, run_dir) in zip(stages, configs, strict=True):
        job = submit(cfg, run_dir, after_job=None if stage.after is None else jobs[stage.after])
        jobs.append(job.job_id)
        uri = redact("uri", default_tracking_uri(run_dir, cfg.tracking.tracking_uri))
        print(
            f"submitted {cfg.name} as job {job.job_id}\n"
            f"  follow:      squeue -j {job.job_id}   |   tail -f {job.paths.stdout}\n"
            f"  errors:      {job.paths.stderr}\n"
            f"  checkpoints: {RunDir(run_dir).checkpoints}   exports: {RunDir(run_dir).export}\n"
            f"  MLflow:      mlflow ui --backend-store-uri {uri}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    leave(main())
