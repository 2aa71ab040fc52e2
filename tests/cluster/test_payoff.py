"""``cluster/launch.py --chain ... --payoff NAME``: a pretraining run, the stages after it, and the pair that shows
what pretraining bought (the same probe from the pretrained encoder and from random weights), linked in MLflow so
every downstream run can be traced back to its pretraining run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.launch import main as launch_main
from tests.support.launch import TINY
from trainer.config import parse_overrides

TINY_STAGE = ["data.num_workers=0", "data.batch_size=8", "deepspeed.precision=fp32", "tracking.log_every=1",
              "eval.every_steps=1000", "checkpoint.every_steps=1000"]  # fmt: skip


def _config(tmp_path: Path, name: str, extends: str, *overrides: str) -> str:
    """A YAML config in ``tmp_path``: ``extends`` with the tiny settings and ``overrides`` (``section.key=value``)."""
    raw = {"extends": extends, **parse_overrides([*TINY_STAGE, *overrides])}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return str(path)


@pytest.mark.slow
def test_a_chain_with_a_payoff_pair_reports_it_and_links_every_run_to_its_pretraining_run(
    tmp_path: Path,
    fmnist_shards: str,
    fmnist_test_shards: str,
    det_shards: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """FCMAE -> fine-tuning -> Mask R-CNN, with a linear-probe payoff pair, through the launcher into one MLflow
    store. The pair starts where it says: the pretrained arm's frozen trunk is the pretraining export, bit for bit,
    and the random arm's is not (the same comparison rejects it). The summary's payoff row is the two runs' top-1.
    In MLflow, each downstream run names its upstream run, the pretraining run at the head of its chain, and is
    nested under it; the random arm is tied to its pair and has no upstream (the control)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = [f"data.train_url={fmnist_shards}", f"data.val_url={fmnist_test_shards}"]
    finetune = _config(tmp_path, "tiny_finetune", "demo_finetune", *data, "schedule.max_steps=2",
                       "schedule.warmup_epochs=0")  # fmt: skip
    train, val = det_shards
    detection = _config(
        tmp_path, "tiny_maskrcnn", "demo_maskrcnn", f"data.train_url={train}", f"data.val_url={val}",
        "data.batch_size=4", "detection.anchor_sizes=[8,16,32,64,128]", "detection.fpn_channels=32",
        "schedule.max_steps=1",
    )  # fmt: skip
    probe = _config(tmp_path, "tiny_linprobe", "demo_linprobe", *data, "schedule.max_steps=3")
    pretrain = tmp_path / "tiny_fcmae"
    args = ["--config", "demo_fcmae", "--local", "--run-dir", str(pretrain), *TINY, "schedule.max_steps=2",
            "data.batch_size=8", "--chain", finetune, "--chain", detection, "--payoff", probe]  # fmt: skip
    assert launch_main(args) == 0
    printed = capsys.readouterr().out
    runs = {name: tmp_path / name for name in ("tiny_fcmae", "tiny_finetune", "tiny_maskrcnn", "tiny_linprobe")}
    runs["random"] = tmp_path / "tiny_linprobe-random"
    metrics = {name: json.loads((d / "export" / "metrics.json").read_text()) for name, d in runs.items()}

    # The pair starts where it says.
    encoder = load_file(str(runs["tiny_fcmae"] / "export" / "model.safetensors"))

    def trunk_is_the_encoder(run: str) -> bool:
        probed = load_file(str(runs[run] / "export" / "model.safetensors"))
        return all(torch.equal(probed[k], v) for k, v in encoder.items())

    assert trunk_is_the_encoder("tiny_linprobe") and not trunk_is_the_encoder("random")
    (row,) = [line for line in printed.splitlines() if line.startswith("payoff")]
    top1 = metrics["tiny_linprobe"]["top1"], metrics["random"]["top1"]
    assert f"linear probe top-1 {top1[0]:.1f}% from the pretrained encoder, {top1[1]:.1f}% from random " in row
    assert f"weights: {top1[0] - top1[1]:+.1f} points" in row
    assert not any(line.startswith("finetune") and "tiny_linprobe" in line for line in printed.splitlines())

    # MLflow: every run traced back to the pretraining run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids = {name: (d / "mlflow_run_id").read_text().strip() for name, d in runs.items()}
    tags = {name: client.get_run(run_id).data.tags for name, run_id in ids.items()}
    head = ids["tiny_fcmae"]
    upstream = {"tiny_finetune": "tiny_fcmae", "tiny_maskrcnn": "tiny_finetune", "tiny_linprobe": "tiny_fcmae"}
    for run, parent in upstream.items():
        assert tags[run]["upstream_run_id"] == ids[parent], run
        assert tags[run]["upstream_export"] == str(runs[parent] / "export" / "model.safetensors")
        model = client.get_logged_model(tags[run]["upstream_model_id"])
        assert model.source_run_id == ids[parent]
    downstream = ("tiny_finetune", "tiny_maskrcnn", "tiny_linprobe", "random")
    for run in downstream:
        assert tags[run]["pretraining_run_id"] == head and tags[run]["mlflow.parentRunId"] == head, run
    assert "pretraining_run_id" not in tags["tiny_fcmae"] and "upstream_run_id" not in tags["random"]
    assert tags["random"]["baseline_of"] == ids["tiny_linprobe"] and tags["random"]["baseline"] == "random init"
    assert client.get_run(ids["random"]).info.run_name == "tiny_linprobe / random init"
    experiment = client.get_run(head).info.experiment_id
    found = client.search_runs([experiment], f"tags.pretraining_run_id = '{head}'")
    assert {r.info.run_id for r in found} == {ids[n] for n in downstream}


def test_a_payoff_needs_a_pretraining_run_first_and_a_classifier_config(
    tmp_path: Path, fmnist_shards: str, fmnist_test_shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything is written: the pair would compare nothing. The accepted pair (the control) points at
    the fixture's shards: the demo configs' default data exists only after ``make demo``."""
    data = [f"data.train_url={fmnist_shards}", f"data.val_url={fmnist_test_shards}"]
    common = ["--local", "--dry-run", "--run-dir", str(tmp_path / "first"), *data]
    assert launch_main(["--config", "demo_finetune", *common, "--payoff", "demo_linprobe"]) == 2
    assert "the first stage must be a pretraining run, not finetune" in capsys.readouterr().err
    assert launch_main(["--config", "demo_fcmae", *common, "--payoff", "demo_maskrcnn"]) == 2
    assert "a fine-tuning or linear-probe config, not a detection one" in capsys.readouterr().err
    probe = _config(tmp_path, "probe", "demo_linprobe", *data)
    assert launch_main(["--config", "demo_fcmae", *common, "--payoff", probe]) == 0, capsys.readouterr().err
    assert not (tmp_path / "first").exists()
