"""The operator tools of a real 2-rank run: a profiler trace of exactly the asked steps from every rank, logged to
MLflow, and MLflow's system metrics; a run without them writes neither."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.support.launch import launch
from trainer.config import ConfigError, load_config


def _mlflow(run_dir: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return client, (run_dir / "mlflow_run_id").read_text().strip()


def _profiled_steps(trace: Path) -> set[int]:
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(name.startswith("aten::conv") for name in names), "no convolution in the trace"
    return {int(m.group(1)) for name in names if (m := re.fullmatch(r"ProfilerStep#(\d+)", name))}


@pytest.mark.slow
def test_a_profile_of_the_asked_steps_and_system_metrics_reach_mlflow(tmp_path: Path) -> None:
    run = tmp_path / "profiled"
    code = launch(
        run, "data.batch_size=4", "schedule.max_steps=6", "tracking.profile_steps=[3,4]",
        "tracking.system_metrics=true", "tracking.system_metrics_interval_s=0.5", ranks=2,
    )  # fmt: skip
    assert code == 0
    assert [p.name for p in (run / "profile").iterdir()] == ["steps_3-4"]
    folder = run / "profile" / "steps_3-4"
    for rank in (0, 1):
        assert _profiled_steps(folder / f"rank_{rank}.trace.json.gz") == {3, 4}
        table = (folder / f"rank_{rank}.ops.txt").read_text()
        assert "Self CPU" in table and "aten::" in table
    client, run_id = _mlflow(run)
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "profile/steps_3-4")}
    assert logged == {f"rank_{r}.{kind}" for r in (0, 1) for kind in ("trace.json.gz", "ops.txt")}
    metrics = client.get_run(run_id).data.metrics
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 * 64 for m in cpu)
    assert metrics["system/system_memory_usage_megabytes"] > 0

    # The control: the same run without the two settings has neither.
    control = tmp_path / "control"
    assert launch(control, "data.batch_size=4", "schedule.max_steps=6", ranks=2) == 0
    assert not (control / "profile").exists()
    client, run_id = _mlflow(control)
    assert client.list_artifacts(run_id, "profile") == []
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]


def test_a_profile_range_must_be_first_then_last() -> None:
    with pytest.raises(ConfigError, match=r"tracking.profile_steps \[5, 3\]"):
        load_config("demo_fcmae", ["tracking.profile_steps=[5,3]"])
