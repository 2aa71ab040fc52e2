"""Every named config either runs or is refused before anything is built: each passes ``--dry-run`` (or fails it
with a clear ``config error``), and each size's pretraining, fine-tuning and detection config trains 2 steps with
``--local`` on this CPU at a tiny image size, from overrides only (the YAML files are not edited)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cluster.launch import main as launch
from trainer.config import PretrainConfig, available_configs, load_config

SIZES = ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"]
REPO = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO / "configs"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
def test_every_config_passes_dry_run_or_says_why(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = launch(["--config", name, "--dry-run"])
    out, err = capsys.readouterr()
    if code == 0:
        assert "world size" in out and "memory/" in out, out[-2000:]
    else:
        assert code == 2 and err.startswith("config error: "), err


def test_named_configs_are_the_product() -> None:
    names = set(available_configs())
    assert {f"{s}_{kind}" for s in SIZES for kind in ("fcmae", "fcmae_continue", "finetune", "maskrcnn")} <= names
    for size in SIZES:  # a continuation keeps its size's batch, sharding and cluster, on a shorter, gentler schedule
        paper = load_config(f"{size}_fcmae")
        cont = load_config(f"{size}_fcmae_continue", ["model.init_from=weights.pt"])
        assert isinstance(cont, PretrainConfig) and isinstance(paper, PretrainConfig)
        assert (cont.data, cont.deepspeed, cont.cluster, cont.model.size) == (
            paper.data,
            paper.deepspeed,
            paper.cluster,
            paper.model.size,
        )
        assert cont.optim.betas == paper.optim.betas and cont.optim.weight_decay == paper.optim.weight_decay
        assert cont.optim.base_lr < paper.optim.base_lr and cont.schedule.epochs < paper.schedule.epochs
        assert cont.schedule.decoder_warmup_steps > 0


TINY_RUN = [
    "--local", "data.image_size=64", "data.num_workers=0", "deepspeed.global_batch=null", "schedule.max_steps=2",
    "tracking.log_every=1", "checkpoint.every_steps=1000",
]  # fmt: skip


def _stage_overrides(kind: str, det: tuple[str, str]) -> list[str]:
    if kind == "fcmae":
        return ["data.train_url=synthetic://64", "data.batch_size=2"]
    if kind == "finetune":
        return ["data.train_url=synthetic://64", "data.val_url=synthetic://8", "data.batch_size=2",
                "model.pretrained=null", "model.num_classes=10"]  # fmt: skip
    return [f"data.train_url={det[0]}", f"data.val_url={det[1]}", "data.batch_size=1", "model.pretrained=null",
            "model.num_classes=10", "detection.anchor_sizes=[8,16,32,64,128]", "detection.fpn_channels=32"]  # fmt: skip


# huge on a CPU holds ~19 GiB for 2 steps (bf16 weights, fp32 master weights, Adam moments and gradients of 660M
# parameters): measured 20.6 GiB in use on a 24 GiB machine, too close to run in CI; it runs where RAM allows.
BIG_MEMORY_GIB = 32
BIG = {"huge"}


def _total_ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fcmae", "finetune", "maskrcnn"])
@pytest.mark.parametrize(
    "size",
    [
        pytest.param(
            s,
            marks=[
                pytest.mark.bigmem,
                pytest.mark.skipif(_total_ram_gib() < BIG_MEMORY_GIB, reason=f"needs {BIG_MEMORY_GIB} GiB of RAM"),
            ],
        )
        if s in BIG
        else s
        for s in SIZES
    ],
)
def test_every_size_and_stage_trains_two_steps_on_cpu(
    size: str,
    kind: str,
    det_shards: tuple[str, str],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    store = tmp_path_factory.getbasetemp() / "configs-mlflow.db"  # one store: its schema is created once
    name = f"{size}_{kind}"
    # The configs train in bf16 (GPUs); a CPU without bf16 instructions emulates it (large fine-tuning at 64 px:
    # 43 s a step against 12 in fp32). atto keeps its configs' precision, so every stage's bf16 path runs here;
    # the larger sizes differ from it in widths, depths and settings, which fp32 runs as well.
    precision = [] if size == "atto" else ["deepspeed.precision=fp32"]
    args = ["--config", name, "--run-dir", str(tmp_path), *TINY_RUN, *_stage_overrides(kind, det_shards),
            *precision, f"tracking.tracking_uri=sqlite:///{store}"]  # fmt: skip
    try:
        assert launch(args) == 0
        weights = load_file(str(tmp_path / "export" / "model.safetensors"))
        assert weights and all(t.isfinite().all() for t in weights.values())
    finally:  # checkpoints and exports of large reach GBs: 21 runs would fill a CI disk
        shutil.rmtree(tmp_path, ignore_errors=True)
        shutil.rmtree(store.parent / "mlartifacts", ignore_errors=True)


def test_local_says_what_it_runs_instead_of_the_cluster(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with caplog.at_level("WARNING", logger="launch"):
        code = launch(["--config", "huge_fcmae", "--nodes", "16", "--local", "--run-dir", str(tmp_path / "run")])
    assert "--local: huge_fcmae runs 1 CPU rank(s) on this machine instead of 128 (16 node(s) x 8 GPUs)" in caplog.text
    # ... and refuses until the smaller global batch is accepted, before anything is written.
    assert code == 2 and "deepspeed.global_batch=4096" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_local_launcher_starts_without_torch() -> None:
    """Everything the launcher runs before the ranks (config, run directory, lock, shard index, the local launcher,
    the summary) imports no torch: ~1.5 s of every start. Control: the ranks' entry point does import it."""
    probe = (
        "import sys, {}; print(sorted(m for m in ('torch', 'deepspeed', 'mlflow', 'webdataset') if m in sys.modules))"
    )
    launcher = "cluster.launch, cluster.local, cluster.summary, data.index_shards"
    cmd = [sys.executable, "-c", probe.format(launcher)]
    assert subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout.strip() == "[]"
    cmd = [sys.executable, "-c", probe.format("trainer.worker")]
    assert "torch" in subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
