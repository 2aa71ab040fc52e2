"""MLflow tracking from rank 0: one run per run directory, continued across restarts.

The store is ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a sqlite file in the run directory
(no server needed). The run id is kept in ``<run_dir>/mlflow_run_id`` so a requeued job logs into the same run;
params and inputs are logged once; the ``restart_count`` tag counts restarts. Other ranks get a tracker that does
nothing.

For people reading the UI: the experiment is a model-training one (MLflow's ``mlflow.experimentKind`` tag, so the
UI opens its training view, not the GenAI one); a run is named after its config, with the run directory's name
added only when the experiment already has a run of that name; its description (``mlflow.note.content``) is the
run's one-line summary (stage, model, world, global batch, lr, steps) and, once it has exported, what it reached.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from trainer.config import TrainConfig
from trainer.export import atomic_write_text
from trainer.resilience import faults
from trainer.resilience.run_lock import slurm_job_id
from trainer.run_dir import MODEL_ID_FILE, RunDir

log = logging.getLogger(__name__)

PRETRAINING_TAG = "pretraining_run_id"
"""The tag naming the pretraining run at the head of a fine-tuning or detection run's chain of stages."""
BASELINE_LABEL = "random init"
"""What a baseline run is: the same protocol from randomly initialized weights."""

_SECRET_KEY = re.compile(r"(secret|token|password|passwd|credential|api_key|access_key|private)", re.IGNORECASE)
_MODEL_NAME_FORBIDDEN = re.compile(r"[/:.%\"' ]+")  # MLflow refuses these in a logged model's name
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def redact(key: str, value: str) -> str:
    """Hide values of secret-looking keys and the user:password part of URLs."""
    if _SECRET_KEY.search(key):
        return "***"
    return _URL_USERINFO.sub(r"\g<scheme>***@", value)


def flatten(tree: dict[str, Any]) -> dict[str, str]:
    """Nested config -> ``{"optim.base_lr": "0.00015", ...}`` with secrets redacted (:func:`redact_tree`)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and all(str(key).isidentifier() for key in node):  # a section, not a value
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = str(node)[:500]

    walk(redact_tree(tree), "")
    return out


def redact_tree(tree: Any, prefix: str = "") -> Any:
    """A copy of a nested config with the values of secret-looking keys and URL passwords redacted as in
    :func:`flatten` (what the console, logs and the MLflow config artifact show)."""
    if isinstance(tree, dict):  # keys may be URLs too (a mixture's sources)
        return {redact(prefix, str(k)): redact_tree(v, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v, prefix) for v in tree]
    if tree is None or isinstance(tree, bool | int | float):
        return "***" if _SECRET_KEY.search(prefix) and tree is not None else tree
    return redact(prefix.rstrip("."), str(tree))


def redacted_yaml(tree: dict[str, Any]) -> str:
    """A resolved config as YAML with secrets redacted."""
    return yaml.safe_dump(redact_tree(tree), sort_keys=False)


def git_commit() -> str:
    """The commit of the code that runs, or ``unknown`` outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_tracking_uri(run_dir: Path, configured: str | None) -> str:
    """Configured URI, else the environment's, else a sqlite file in the run directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{RunDir(run_dir.resolve()).mlflow_store}"


def job_hosts(world_size: int, ranks_per_node: int) -> int:
    """How many hosts the job spans: SLURM's count, else the world over the config's ranks per node."""
    return int(os.environ.get("SLURM_JOB_NUM_NODES", max(1, world_size // max(1, ranks_per_node))))


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The experiment tag that makes MLflow's UI show a training experiment (runs, metrics, models)."""
DESCRIPTION_TAG = "mlflow.note.content"
"""The tag MLflow shows as a run's description."""
SETUP_TAG = "first_start_logged"
"""Set once a run's first start has logged everything it logs once (parameters, config, inputs, upstream links)."""


STORE_TEMPLATES = Path(__file__).resolve().parents[2] / ".cache" / "mlflow"
"""Empty sqlite stores, one per MLflow version, that a run's new store starts from (see :func:`seed_sqlite_store`)."""


def seed_sqlite_store(db: Path, templates: Path = STORE_TEMPLATES) -> None:
    """Start the sqlite store ``db`` (not there yet) as a copy of an empty store of this MLflow version. MLflow makes
    a new store by running every schema migration since its first (~1 s, more on a busy machine, at each new run);
    the template is made that way once, in a temporary file renamed into place, so concurrent runs never copy half
    of one. A template that cannot be made or copied (a read-only checkout) leaves the store to MLflow."""
    import mlflow
    from mlflow.tracking import MlflowClient

    template = templates / f"empty-{mlflow.__version__}.db"
    try:
        if not template.exists():
            templates.mkdir(parents=True, exist_ok=True)
            tmp = templates / f".{template.name}.tmp{os.getpid()}"
            tmp.unlink(missing_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # creates the schema
            os.replace(tmp, template)
        copy = db.with_name(f".{db.name}.tmp{os.getpid()}")
        shutil.copyfile(template, copy)
        os.replace(copy, db)
    except OSError as err:
        log.info("MLflow creates the store %s itself (no template: %s)", db, err)


class Tracker:
    """Rank 0's MLflow run; a no-op on other ranks or when ``enabled`` is false."""

    def __init__(self, run_dir: Path, uri: str | None, experiment: str, enabled: bool) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.uri = default_tracking_uri(run_dir, uri)
        # MLflow prints run links with the raw server URI (credentials included) to stdout; we log a redacted one.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.run_id: str | None = None
        self.restart_count = 0
        self._client: Any = None
        self._baseline_runs: dict[str, str] = {}
        self._first_start_logged = False
        """Whether the run is tagged ``first_start_logged`` (read by :meth:`start` with the run it continues)."""
        self._experiment = experiment

    def start_run(self, cfg: TrainConfig, world_size: int, description: str) -> None:
        """Start (or continue) the run of ``cfg`` with the run's tags: the code's commit, the world and its hosts,
        the SLURM job, the stage; a first start also records the description, the parameters, the resolved config,
        the run's inputs (:mod:`trainer.observability.inputs`) and its upstream links, then tags the run
        ``first_start_logged`` (a start killed before that is completed by the next one)."""
        tags = {
            "git_commit": git_commit(),
            "world_size": str(world_size),
            "hosts": str(job_hosts(world_size, cfg.cluster.ranks_per_node)),
            "slurm_job_id": slurm_job_id() or "none",
            "stage": cfg.stage,
        }
        resolved = cfg.model_dump(mode="json")
        name = f"{cfg.name} / {BASELINE_LABEL}" if cfg.tracking.baseline_of else cfg.name
        self.start(tags, run_name=name, description=description)
        if not self.enabled or self._first_start_logged:
            return
        from trainer.observability.inputs import as_mlflow, run_inputs

        faults.at("tracking", None, self.run_dir)
        self._log_params(flatten(resolved))
        self.log_config(resolved)
        self._client.log_inputs(self.run_id, datasets=as_mlflow(run_inputs(cfg, self.run_dir)))
        upstream = getattr(cfg.model, "pretrained", None) or getattr(cfg.model, "init_from", None)
        if upstream:
            self.link_upstream(upstream, cfg.stage)
        if cfg.tracking.baseline_of:
            self.link_baseline(Path(cfg.tracking.baseline_of))
        self._client.set_tag(self.run_id, SETUP_TAG, "true")
        self._first_start_logged = True

    def start(self, tags: dict[str, str], run_name: str, description: str = "") -> None:
        """Create the run, or continue the one recorded in the run directory (restart count + 1). A new run is
        named ``run_name``, with the run directory's name added when the experiment already has a run so named."""
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        db = Path(self.uri.removeprefix("sqlite:///")) if self.uri.startswith("sqlite:///") else None
        if db is not None and not db.exists():
            seed_sqlite_store(db)
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        id_file = RunDir(self.run_dir).mlflow_run_id
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            run = self._client.get_run(self.run_id)
            self.restart_count = int(run.data.tags.get("restart_count", "0")) + 1
            self._first_start_logged = run.data.tags.get(SETUP_TAG) == "true"
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name(self._experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                # A sqlite store would put artifacts in ./mlruns of whatever directory the job started in:
                # keep them beside the database instead.
                location = None if db is None else (db.parent / "mlartifacts").resolve().as_uri()
                experiment_id = self._client.create_experiment(self._experiment, artifact_location=location)
                self._client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
            name = self._free_run_name(experiment_id, run_name)
            tags_at_creation = {DESCRIPTION_TAG: description} if description else {}
            self.run_id = self._client.create_run(experiment_id, run_name=name, tags=tags_at_creation).info.run_id
            atomic_write_text(id_file, self.run_id)
        for key, value in {**tags, "restart_count": str(self.restart_count)}.items():
            self._client.set_tag(self.run_id, key, value)
        log.info("MLflow run %s at %s", self.run_id, redact("uri", self.uri))

    def _free_run_name(self, experiment_id: str, name: str) -> str:
        """``name``, or ``name-<run dir>`` (then ``-2``, ``-3``, ...) when the experiment has a run so named."""

        def taken(candidate: str) -> bool:
            quoted = candidate.replace("'", "\\'")
            found = self._client.search_runs([experiment_id], f"attributes.run_name = '{quoted}'", max_results=1)
            return bool(found)

        if not taken(name):
            return name
        base = f"{name}-{self.run_dir.name}" if self.run_dir.name != name else name
        candidate, n = base, 1
        while candidate == name or taken(candidate):
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def log_model(
        self, export_dir: Path, config: dict[str, Any], stage: str, step: int, register_as: str | None
    ) -> str | None:
        """The stage's export as an MLflow logged model of this run: every file of ``export_dir`` (the weights as
        safetensors, ``metrics.json``) and the resolved ``config.yaml`` (secrets redacted) that builds them back
        (:func:`trainer.stages.load_export`); ``register_as`` registers it as a new version of that model. The
        model's id is written to ``export_dir/mlflow_model_id`` last (a later stage that reads this export links it
        as its input; a run killed before it logs the export again). Returns the id (None on ranks that do not
        track)."""
        if not self.enabled or self.run_id is None:
            return None
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        run = self._client.get_run(self.run_id)
        model = self._client.create_logged_model(
            run.info.experiment_id, name=_MODEL_NAME_FORBIDDEN.sub("-", run.info.run_name), source_run_id=self.run_id,
            model_type=stage,
            params={"stage": stage, "model.size": str(config.get("model", {}).get("size"))},
        )  # fmt: skip
        try:
            self._client.log_model_artifacts(model.model_id, str(export_dir))
            faults.at("publish", step, self.run_dir)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.yaml").write_text(redacted_yaml(config))
                self._client.log_model_artifacts(model.model_id, tmp)
        except BaseException:
            self._client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self._client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self._client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])  # the run page lists it
        self._client.set_tag(self.run_id, "logged_model_id", model.model_id)
        if register_as:
            self._register(model.model_id, model.artifact_location, register_as)
        atomic_write_text(export_dir / MODEL_ID_FILE, model.model_id)  # last: the export is published
        return str(model.model_id)

    def _register(self, model_id: str, location: str, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # The logged model's own location as the source: a models:/ source is looked up through MLflow's global
        # tracking URI, not this client's (mlflow/store/model_registry/sqlalchemy_store.py, create_model_version).
        version = self._client.create_model_version(name, source=location, run_id=self.run_id, model_id=model_id)
        log.info("registered the export as %s version %s", name, version.version)

    def link_upstream(self, export: str, stage: str) -> None:
        """Tie this run to the export it starts from (``model.pretrained`` or ``model.init_from``: an export's file,
        the export directory or its run directory), so a chain of stages can be followed in the UI: the tag
        ``upstream_export`` names it; when the export says which logged model it is, that model is an input of
        this run (``upstream_model_id``) and the run that logged it is ``upstream_run_id``. A fine-tuning or
        detection run also names the pretraining run at the head of its chain (``pretraining_run_id``) and, in the
        same experiment, is nested under it (the UI's runs table lists a pretraining run's downstream runs under
        it)."""
        if not self.enabled or self.run_id is None:
            return
        self.set_tag("upstream_export", redact("uri", export))
        path = Path(export)
        found = [p / MODEL_ID_FILE for p in (path.parent, path, path / "export") if (p / MODEL_ID_FILE).is_file()]
        if "://" in export or not found:
            return
        from mlflow.entities import LoggedModelInput
        from mlflow.exceptions import MlflowException

        model_id = found[0].read_text().strip()
        try:
            source_run_id = self._client.get_logged_model(model_id).source_run_id
        except MlflowException as err:  # logged into another store: the export's path is the link left
            log.warning("the upstream export's model %s is not in this MLflow store (%s): not linked", model_id, err)
            return
        self._client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])
        self.set_tag("upstream_model_id", model_id)
        if source_run_id is None:  # a model logged outside a run
            return
        self.set_tag("upstream_run_id", source_run_id)
        if stage == "pretrain":
            return
        upstream = self._client.get_run(source_run_id)
        head = upstream.data.tags.get(PRETRAINING_TAG)
        if head is None and upstream.data.tags.get("stage") == "pretrain":
            head = source_run_id
        if head is not None:
            self._tag_pretraining_run(head)

    def link_baseline(self, of_run_dir: Path) -> None:
        """Mark this run as the random-weights baseline of the run in ``of_run_dir`` (its pair in the payoff line of
        ``cluster/launch.py --payoff``): the tags ``baseline_of`` and ``baseline``, and that run's pretraining run
        (tag and nesting), so the pair is found together under the pretraining run in the UI."""
        from mlflow.exceptions import MlflowException

        id_file = RunDir(of_run_dir).mlflow_run_id
        try:
            of = self._client.get_run(id_file.read_text().strip())
        except (OSError, MlflowException) as err:
            log.warning("tracking.baseline_of=%s: no MLflow run of it to link (%s)", of_run_dir, err)
            return
        self.set_tag("baseline_of", of.info.run_id)
        self.set_tag("baseline", BASELINE_LABEL)
        if PRETRAINING_TAG in of.data.tags:
            self._tag_pretraining_run(of.data.tags[PRETRAINING_TAG])

    def _tag_pretraining_run(self, run_id: str) -> None:
        self.set_tag(PRETRAINING_TAG, run_id)
        experiment = self._client.get_run(self.run_id).info.experiment_id
        if self._client.get_run(run_id).info.experiment_id == experiment:
            self.set_tag("mlflow.parentRunId", run_id)

    def describe_result(self, step: int, result: str) -> None:
        """Add what the run reached (the export's summary) to its description, under the start's summary line."""
        if not self.enabled or self.run_id is None:
            return
        first = self._client.get_run(self.run_id).data.tags.get(DESCRIPTION_TAG, "").split("\n\n", 1)[0]
        self._client.set_tag(self.run_id, DESCRIPTION_TAG, f"{first}\n\nReached at step {step}: {result}".strip())

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One batched call for all metrics of a step."""
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_config(self, tree: dict[str, Any]) -> None:
        """Upload the resolved config as ``config.yaml`` with secrets redacted (the run directory keeps the real
        one, which the ranks read)."""
        if not self.enabled or self.run_id is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(redacted_yaml(tree))
            self._client.log_artifact(self.run_id, str(path))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (config, image, exported weights)."""
        if self.enabled and self.run_id is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        """Tag the run (a rollback, a mirror left incomplete): visible on the run's page and searchable."""
        if self.enabled and self.run_id is not None:
            self._client.set_tag(self.run_id, key, value)

    def log_missing_rollbacks(self, log_path: Path, detected_at: list[int]) -> None:
        """The rollbacks of ``log_path`` (detected at the steps ``detected_at``) that the run does not show yet: a
        run killed between recording a rollback and logging it logs it when it resumes."""
        if not self.enabled or self.run_id is None or not detected_at:
            return
        shown = int(self._client.get_run(self.run_id).data.tags.get("rollbacks", "0"))
        for count, step in enumerate(detected_at[shown:], start=shown + 1):
            self.log_rollback(count, log_path, step)

    def log_rollback(self, count: int, log_path: Path, step: int) -> None:
        """The run's ``count``-th rollback, detected at ``step``: a metric, a tag and the rollback log."""
        self.log_metrics({"train/rollbacks": float(count)}, step)
        self.set_tag("rollbacks", str(count))
        self.log_artifact(log_path, "rollbacks")

    def log_baseline(self, label: str, metrics: dict[str, float], step: int) -> None:
        """A baseline's values under the names of the metrics they are a baseline for, in a child run named
        ``<run> / <label>`` (found again after a restart): MLflow's charts draw a metric over the runs shown, so the
        run and its baseline share one chart."""
        if not self.enabled or self.run_id is None:
            return
        child = self._baseline_runs.get(label)
        if child is None:
            run = self._client.get_run(self.run_id)
            query = f"tags.baseline_of = '{self.run_id}' and tags.baseline = '{label}'"
            found = self._client.search_runs([run.info.experiment_id], query, max_results=1)
            if found:
                child = found[0].info.run_id
            else:
                about = f"The baseline of {run.info.run_name}: its probes on a {label} encoder."
                tags = {"mlflow.parentRunId": self.run_id, "baseline_of": self.run_id, "baseline": label,
                        DESCRIPTION_TAG: about}  # fmt: skip
                name = f"{run.info.run_name} / {label}"
                child = self._client.create_run(run.info.experiment_id, run_name=name, tags=tags).info.run_id
            self._baseline_runs[label] = child
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(child, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED, FAILED, or KILLED (preempted: it continues after the requeue). Closing a failed
        run can fail too (a full disk, a lost server): that is logged, not raised, so it never masks the cause."""
        if not self.enabled or self.run_id is None:
            return
        try:
            # Every baseline run of this run, also those of earlier segments that a kill left open.
            experiment = self._client.get_run(self.run_id).info.experiment_id
            found = self._client.search_runs([experiment], f"tags.baseline_of = '{self.run_id}'")
            for child in {*self._baseline_runs.values(), *(run.info.run_id for run in found)}:
                self._client.set_terminated(child, status=status)
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:
            if status != "FAILED":
                raise
            log.error("could not close the MLflow run: %s: %s", type(err).__name__, err)


def download_logged_model(model_id: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """The files of the logged model ``model_id`` (an export and its ``config.yaml``) downloaded into ``dst``; build
    the model back with :func:`trainer.stages.load_export`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    location = MlflowClient(tracking_uri=uri).get_logged_model(model_id).artifact_location
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst), tracking_uri=uri))
