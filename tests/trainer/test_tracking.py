"""Params, metrics, tags and artifacts of a run reach a real MLflow tracking server; secrets do not."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.trainer.conftest import launch
from trainer.distributed import free_port
from trainer.tracking import flatten, redact


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
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
    url = f"http://127.0.0.1:{port}"
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


@pytest.mark.slow
def test_a_run_reaches_the_tracking_server(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    secret_url = "s3://alice:hunter2@bucket/val"
    code = launch(
        tmp_path, "data.batch_size=4", "schedule.max_steps=4", "tracking.eval_every=2", "tracking.experiment=ci",
        f"data.val_url={secret_url}",
    )  # fmt: skip
    assert code == 0
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
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    metrics = run.data.metrics
    for name in ("lr", "grad_norm", "step_time_s", "peak_mem_gb", "eta_s", "feature_cosine_distance"):
        assert math.isfinite(metrics[name]), name
    assert metrics["images_per_s"] > 0 and 0 <= metrics["data_wait_pct"] <= 100
    assert 0 < metrics["feature_cosine_distance"] <= 2
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "reconstructions", "export"} <= artifacts
    images = [a.path for a in client.list_artifacts(run_id, "reconstructions")]
    assert images and all(p.endswith(".png") for p in images)
    assert "export/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "export")}

    # The same command with a longer schedule resumes the run and continues the same MLflow run.
    code = launch(
        tmp_path, "data.batch_size=4", "schedule.max_steps=6", "tracking.eval_every=2", "tracking.experiment=ci",
        f"data.val_url={secret_url}",
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run_id
    resumed = client.get_run(run_id)
    assert resumed.data.tags["restart_count"] == "1" and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]


def test_secrets_are_redacted_from_params() -> None:
    params = flatten({"data": {"train_url": "s3://key:secret@bucket/x"}, "aws_secret_access_key": "abc", "n": 3})
    assert params == {"data.train_url": "s3://***@bucket/x", "aws_secret_access_key": "***", "n": "3"}
    assert redact("optim.base_lr", "0.1") == "0.1"
