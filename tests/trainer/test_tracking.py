"""Params, metrics, tags and artifacts of a run reach a real MLflow tracking server; secrets do not."""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cluster.launch import training_view
from tests.support.apt import Unavailable, ensure_programs, which
from tests.support.launch import launch
from trainer import stages as trainer_stages
from trainer.config import load_config
from trainer.observability.logger import result_line
from trainer.observability.tracking import (
    DESCRIPTION_TAG,
    EXPERIMENT_KIND,
    Tracker,
    download_logged_model,
    flatten,
    redact,
    seed_sqlite_store,
)
from trainer.rendezvous import free_port
from trainer.stages import load_export


class ServerUrl(str):
    """The server's URL, with the directory that holds its whole store."""

    root: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerUrl]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=open(root / "server.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = ServerUrl(f"http://127.0.0.1:{port}")
    url.root = root
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


SECRETS = ("hunter2", "sekrit42", "pa55word")


@pytest.mark.slow
def test_a_run_reaches_the_tracking_server(
    mlflow_server: ServerUrl, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    # Secrets where users put them: a password in a URL and in the tracking URI, a token in DeepSpeed's keys. (Any
    # string holding a URL with a password is redacted; the URL sits in a data key synthetic pretraining never reads.)
    secret_url = "s3://alice:hunter2@bucket/val"
    secret_uri = mlflow_server.replace("http://", "http://bob:pa55word@")
    code = launch(
        tmp_path, "data.batch_size=4", "schedule.max_steps=4", "eval.every_steps=2", "tracking.experiment=ci",
        f"data.label_field={secret_url}", f"tracking.tracking_uri={secret_uri}",
        "deepspeed.overrides.api_token=sekrit42", "tracking.register_as=fcmae-ci",
    )  # fmt: skip
    assert code == 0
    console = "".join(capfd.readouterr())
    assert "# resolved config" in console and "MLflow run" in console
    _assert_no_secret("the console", console)
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.size"] == "atto"
    assert run.data.params["optim.base_lr"] == "0.0015"
    assert "hunter2" not in " ".join(run.data.params.values())
    assert run.data.tags["restart_count"] == "0"
    assert run.data.tags["world_size"] == "1"
    assert len(run.data.tags["git_commit"]) >= 7
    losses = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    metrics = run.data.metrics
    names = ("train/lr", "train/grad_norm", "speed/step_time_s", "speed/peak_mem_gb", "speed/eta_s",
             "eval/feature_cosine_distance_s4", "eval/eval_s")  # fmt: skip
    for name in names:
        assert math.isfinite(metrics[name]), name
    assert metrics["speed/images_per_s"] > 0 and 0 <= metrics["speed/data_wait_pct"] <= 100
    assert 0 < metrics["eval/feature_cosine_distance_s4"] <= 2
    assert all(name.split("/")[0] in ("train", "speed", "eval") for name in metrics), sorted(metrics)
    # For people: a training experiment, the run named after its config, described by its summary line and, once
    # exported, what it reached; its inputs say which data it read.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    assert run.info.run_name == "demo_fcmae"
    description = run.data.tags[DESCRIPTION_TAG]
    assert description.startswith("pretrain | FCMAE atto (gather, mask 0.6)") and "| world 1 |" in description
    assert "global batch 4" in description and "| 4 steps" in description
    assert description.endswith("Reached at step 4: loss " + result_line(_metrics(tmp_path)).removeprefix("loss "))
    (training,) = run.inputs.dataset_inputs
    assert training.dataset.name == "synthetic" and training.dataset.source_type == "synthetic"
    assert {t.key: t.value for t in training.tags} == {"mlflow.data.context": "training"}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "reconstructions"} <= artifacts
    images = [a.path for a in client.list_artifacts(run_id, "reconstructions")]
    assert images and all(p.endswith(".png") for p in images)
    # The export is a logged model of the run, registered, and builds our model back exactly.
    model_id = run.data.tags["logged_model_id"]
    assert (tmp_path / "export" / "mlflow_model_id").read_text() == model_id
    logged = client.get_logged_model(model_id)
    assert (logged.source_run_id, str(logged.status), logged.name) == (run_id, "READY", "demo_fcmae")
    (version,) = client.search_model_versions("name = 'fcmae-ci'")
    assert (version.version, version.source, version.run_id) == ("1", logged.artifact_location, run_id)
    files = download_logged_model(model_id, tmp_path / "downloaded", mlflow_server)
    assert {"model.safetensors", "fcmae.safetensors", "metrics.json", "config.yaml"} <= {
        p.name for p in files.iterdir()
    }
    _assert_no_secret("the logged model's config", (files / "config.yaml").read_text())
    model, cfg = load_export(files)
    exported = load_file(str(tmp_path / "export" / "fcmae.safetensors"))
    assert cfg.name == "demo_fcmae" and type(model).__name__ == "FCMAE"
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    fresh = trainer_stages.build_model(cfg).state_dict()  # control: the same check tells an untrained model apart
    assert not all(torch.equal(exported[k], v) for k, v in fresh.items())

    # The same command with a longer schedule resumes the run and continues the same MLflow run.
    code = launch(
        tmp_path, "data.batch_size=4", "schedule.max_steps=6", "eval.every_steps=2", "tracking.experiment=ci",
        f"data.label_field={secret_url}", f"tracking.tracking_uri={secret_uri}",
        "deepspeed.overrides.api_token=sekrit42", "tracking.register_as=fcmae-ci",
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run_id
    resumed = client.get_run(run_id)
    assert resumed.data.tags["restart_count"] == "1" and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    again = resumed.data.tags[DESCRIPTION_TAG]  # the same summary line; what it reached is replaced, not added
    assert again.split("\n\n")[0] == description.split("\n\n")[0] and again.count("Reached") == 1
    assert again.endswith("Reached at step 6: " + result_line(_metrics(tmp_path)))
    assert len(resumed.inputs.dataset_inputs) == 1  # inputs are logged once
    second = resumed.data.tags["logged_model_id"]  # the longer schedule's export: a new version of the model
    versions = {v.version: v.source for v in client.search_model_versions("name = 'fcmae-ci'")}
    assert second != model_id and versions == {
        "1": logged.artifact_location, "2": client.get_logged_model(second).artifact_location}  # fmt: skip
    _assert_no_secret("the console", "".join(capfd.readouterr()))

    # Nothing in the whole MLflow store (database, artifacts, server log) or in the run directory's files, but
    # the resolved config.yaml and DeepSpeed's binary checkpoint shards.
    store = mlflow_server.root
    files = [*store.rglob("*"), *(p for p in tmp_path.rglob("*") if p != tmp_path / "config.yaml")]
    for path in files:
        if path.is_file() and path.suffix not in (".pt", ".safetensors"):
            _assert_no_secret(str(path), path.read_bytes().decode("utf-8", "replace"))
    assert "hunter2" in (tmp_path / "config.yaml").read_text()  # the ranks read the real values from the run dir


def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "export" / "metrics.json").read_text())


def test_a_run_records_its_inputs_and_gets_a_free_name(
    tmp_path: Path, fmnist_shards: str, fmnist_test_shards: str
) -> None:
    """Each shard set a fine-tuning run reads (two mixture sources with their weights, the validation set) and its
    upstream export are the run's MLflow inputs, digested by their manifests and the export's bytes. Control: a
    copy of a set whose manifest changed gets another digest. A second run of the same config in the experiment is
    named after its run directory."""
    from mlflow.tracking import MlflowClient

    upstream = tmp_path / "upstream" / "model.safetensors"
    upstream.parent.mkdir()
    upstream.write_bytes(b"weights of an upstream export")
    changed = tmp_path / "changed"
    shutil.copytree(fmnist_test_shards, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    (changed / "manifest.json").write_text(json.dumps({**manifest, "created_utc": "2026-12-06T00:00:00Z"}))
    overrides = [f"data.train_url={{{fmnist_shards}: 3.0, {changed}: 1.0}}", f"data.val_url={fmnist_test_shards}",
                 f"model.pretrained={upstream}"]  # fmt: skip
    cfg = load_config("demo_finetune", overrides)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    upstream_model = client.create_logged_model(client.create_experiment("upstream"), name="pretrain").model_id
    (upstream.parent / "mlflow_model_id").write_text(upstream_model)  # as the upstream run's export leaves it
    tracker = Tracker(tmp_path / "first", uri, "inputs", enabled=True)
    (tmp_path / "first").mkdir()
    tracker.start_run(cfg, 1, "finetune | a summary line")
    run = client.get_run(tracker.run_id)
    assert [m.model_id for m in run.inputs.model_inputs] == [upstream_model]  # the chain of stages
    assert run.data.tags["upstream_export"] == str(upstream) and run.data.tags["upstream_model_id"] == upstream_model
    assert "upstream_run_id" not in run.data.tags  # that model was logged outside a run

    def digest(path: Path | str) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

    found = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset
             for d in run.inputs.dataset_inputs}  # fmt: skip
    assert sorted(found) == [("changed", "training"), ("test", "validation"), ("train", "training"),
                             ("upstream-export", "upstream")]  # fmt: skip
    train, test, copy = found["train", "training"], found["test", "validation"], found["changed", "training"]
    assert train.digest == digest(Path(fmnist_shards) / "manifest.json")
    assert json.loads(train.profile) == {"samples": 768, "shards": 6, "classes": 10, "weight": 3.0}
    assert json.loads(train.source) == {"url": fmnist_shards} and train.source_type == "local"
    assert test.digest == digest(Path(fmnist_test_shards) / "manifest.json") and "weight" not in test.profile
    assert copy.digest == digest(changed / "manifest.json") != test.digest  # control: another version
    assert found["upstream-export", "upstream"].digest == digest(upstream)
    assert run.info.run_name == "demo_finetune" and run.data.tags[DESCRIPTION_TAG] == "finetune | a summary line"
    tracker.describe_result(5, "top-1 50.0%")
    assert client.get_run(tracker.run_id).data.tags[DESCRIPTION_TAG] == (
        "finetune | a summary line\n\nReached at step 5: top-1 50.0%"
    )
    names = []
    for run_dir in ("second", "demo_finetune", "second"):
        (tmp_path / run_dir).mkdir(exist_ok=True)
        (tmp_path / run_dir / "mlflow_run_id").unlink(missing_ok=True)
        other = Tracker(tmp_path / run_dir, uri, "inputs", enabled=True)
        other.start_run(cfg, 1, "finetune | a summary line")
        names.append(client.get_run(other.run_id).info.run_name)
    assert names == ["demo_finetune-second", "demo_finetune-2", "demo_finetune-second-2"]


def _assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {where}"


def test_secrets_are_redacted_from_params() -> None:
    params = flatten({"data": {"train_url": "s3://key:secret@bucket/x"}, "aws_secret_access_key": "abc", "n": 3})
    assert params == {"data.train_url": "s3://***@bucket/x", "aws_secret_access_key": "***", "n": "3"}
    assert redact("optim.base_lr", "0.1") == "0.1"


def _store_contents(db: Path) -> tuple[list[tuple[str, Any]], list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Tables and indexes (each definition as its set of lines: SQLAlchemy's sqlite migrations write a table's
    CHECK constraints in an order that differs between two stores made in one process), schema version,
    experiments."""
    with sqlite3.connect(db) as con:
        ddl = con.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name").fetchall()
        schema = [(name, sorted(line.strip().rstrip(",") for line in sql.splitlines())) for name, sql in ddl]
        version = con.execute("SELECT * FROM alembic_version").fetchall()
        experiments = con.execute("SELECT experiment_id, name, lifecycle_stage FROM experiments").fetchall()
    return schema, version, experiments


def test_a_new_store_starts_as_the_store_mlflow_makes_itself(tmp_path: Path) -> None:
    """A run's new sqlite store is a copy of an empty store of this MLflow version, made once: the same tables,
    indexes, schema version and default experiment as the store MLflow makes by migrating. Control: a store one
    index short is told apart by the same comparison."""
    from mlflow.tracking import MlflowClient

    templates = tmp_path / "templates"
    seed_sqlite_store(tmp_path / "seeded.db", templates)
    seed_sqlite_store(tmp_path / "again.db", templates)  # from the template made by the first
    assert len(list(templates.glob("empty-*.db"))) == 1 and not list(templates.glob(".*"))
    own = tmp_path / "own.db"
    MlflowClient(tracking_uri=f"sqlite:///{own}").search_experiments()
    assert _store_contents(tmp_path / "seeded.db") == _store_contents(own) == _store_contents(tmp_path / "again.db")
    assert _store_contents(own)[2], "MLflow's store holds its default experiment"
    short = tmp_path / "short.db"
    shutil.copyfile(own, short)
    with sqlite3.connect(short) as con:
        (index,) = con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL LIMIT 1"
        ).fetchone()
        con.execute(f"DROP INDEX {index}")
    assert _store_contents(short) != _store_contents(own)
    # A directory where no template can be made leaves the store to MLflow (no file, no error).
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the templates directory would go")
    seed_sqlite_store(tmp_path / "left.db", blocked)
    assert not (tmp_path / "left.db").exists()


def _headless(chromium: str, *args: str) -> str:
    """Headless Chromium (as root: no sandbox) with ``args``, given 20 s of page time to run MLflow's scripts;
    returns its standard output."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=20000", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def _page_text(chromium: str, url: str) -> str:
    """The visible text of ``url`` as headless Chromium renders it (MLflow's UI is a script-built page), cells
    separated by `` | ``."""
    dom = _headless(chromium, "--dump-dom", url)
    text = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    text = re.sub(r"(\s*\|\s*)+", " | ", re.sub(r"<[^>]+>", " | ", text))
    return html.unescape(text)


@pytest.mark.slow
def test_the_run_page_in_a_browser_shows_datasets_model_and_description(
    mlflow_server: ServerUrl, tmp_path: Path, fmnist_shards: str
) -> None:
    """Headless Chromium (Debian's) renders the UI's run page from the server: it shows the description, the shard
    set with its digest, the logged model and its registered version, and the training metrics before the speed
    and evaluation ones. Control: the page of a bare run in the same experiment shows none of the three."""
    from mlflow.tracking import MlflowClient

    try:
        ensure_programs(["chromium"], ["chromium"], "the browser test")
    except Unavailable as e:
        pytest.skip(str(e))
    chromium = which("chromium")
    assert chromium is not None
    run_dir = tmp_path / "run"
    overrides = (f"data.train_url={fmnist_shards}", "data.batch_size=4", "schedule.max_steps=2",
                 "tracking.experiment=ui", f"tracking.tracking_uri={mlflow_server}",
                 "tracking.register_as=ui-encoder")  # fmt: skip
    assert launch(run_dir, *overrides) == 0
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    (dataset,) = (d.dataset for d in run.inputs.dataset_inputs)
    model = client.get_logged_model(run.data.tags["logged_model_id"])
    summary_line = run.data.tags[DESCRIPTION_TAG].split("\n")[0]

    def shown(text: str) -> dict[str, bool]:
        return {
            "description": summary_line in text and "Reached at step 2: loss" in text,
            "dataset": f"Datasets | {dataset.name} ({dataset.digest}) | training" in text,
            "model": "Logged models (1) |" in text and f"| {model.name} | Ready |" in text,
            "registered": "Registered models | ui-encoder | v1" in text,
        }

    page = f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    text = _page_text(chromium, page)
    assert shown(text) == dict.fromkeys(("description", "dataset", "model", "registered"), True), text[:3000]
    assert text.index("train/loss") < text.index("speed/images_per_s") < text.index("eval/eval_s")
    screenshot = run_dir / "run_page.png"
    _headless(chromium, "--window-size=1400,2400", f"--screenshot={screenshot}", page)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000

    # The experiment's page as the launcher prints it opens the model-training view (its runs with their datasets);
    # control: without the view in the URL, MLflow 3.17's UI opens its GenAI overview.
    view = training_view(mlflow_server, "ui")
    assert view == f"{mlflow_server}/#/experiments/{run.info.experiment_id}?workflowType=machine_learning"
    runs_page = _page_text(chromium, view)
    assert "Run Name" in runs_page and f"| {run.info.run_name} |" in runs_page, runs_page[:3000]
    assert f"{dataset.name} ({dataset.digest})" in runs_page
    assert "Run Name" not in _page_text(chromium, view.split("?")[0])

    bare = client.create_run(run.info.experiment_id, run_name="bare").info.run_id
    client.set_terminated(bare)
    control = _page_text(chromium, f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{bare}")
    assert "| bare |" in control and not any(shown(control).values()), control[:3000]
