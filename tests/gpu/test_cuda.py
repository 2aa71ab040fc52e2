"""What only a GPU can show: bf16 autocast and channels_last on CUDA, the gather backend on CUDA, one step of every
size, single-GPU DeepSpeed on NCCL through the launcher, huge's measured peak memory against the dry-run plan with
and without activation checkpointing, and a profile's CUDA kernels, memory snapshot and NVML metrics. Marked
``cuda``: skipped on machines without one (``bench/gpu_check.sh`` runs them where a GPU is lent).

``GPU_CHECK_DEVICE=cpu`` (``bench/gpu_check.sh --cpu-rehearsal``) runs the same tests on the CPU at tiny sizes (atto,
64 px), leaving out only what a CPU cannot show (memory against the plan, CUDA kernels, NVML): the rehearsal that
the kit, the machine's torch and these code paths work before a lent GPU's minutes are spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.plan import make_plan
from models.convnextv2 import SIZES
from models.fcmae import FCMAE
from tests.support.tensors import randomize_, rel_err
from trainer.config import load_config

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
REHEARSAL = DEVICE == "cpu"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not REHEARSAL and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
REPO = Path(__file__).resolve().parents[2]
PX = 64 if REHEARSAL else 224
RUN_SIZES = ["atto"] if REHEARSAL else list(SIZES)
TINY = ["model.size=atto", "data.image_size=64", "data.num_workers=0"] if REHEARSAL else []
"""The launcher tests' overrides in a rehearsal (huge_fcmae's settings otherwise)."""


def _tracking_uri(run_dir: Path) -> str:
    """The environment's store (gpu_check.sh sets a file store: the kit's MLflow client has no sqlite), else a
    sqlite file beside the run."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.parent}/mlflow-{run_dir.name}.db"


def test_gather_equals_dense_masked_on_cuda_in_bf16() -> None:
    model = randomize_(FCMAE(RUN_SIZES[0] if REHEARSAL else "tiny", decoder_dim=128, backend="dense_masked"), seed=3)
    model = model.to(DEVICE)
    assert isinstance(model, FCMAE)
    imgs = torch.randn(8, 3, PX, PX, device=DEVICE).contiguous(memory_format=torch.channels_last)
    mask = model.random_mask(imgs, torch.Generator().manual_seed(0))
    visible = model.visible_patches(PX // 32, PX // 32)
    out = {}
    for backend in ("dense_masked", "gather"):
        model.backend = backend
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss, pred, _ = model(imgs, mask, visible=visible)
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        out[backend] = (pred.float(), grads)
    assert rel_err(out["gather"][0], out["dense_masked"][0]) < 2e-2  # bf16: ~3 significant digits per op
    assert rel_err(out["gather"][1], out["dense_masked"][1]) < 5e-2


@pytest.mark.parametrize("size", RUN_SIZES)
def test_one_bf16_channels_last_step_of_every_size(size: str) -> None:
    torch.manual_seed(0)
    model = FCMAE(size, grad_checkpointing=size in ("large", "huge")).to(DEVICE).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.randn(4, 3, PX, PX, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _, _ = model(imgs)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss).item()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _launch(run_dir: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "cluster/launch.py", "--local", "--config", "huge_fcmae", "--run-dir", str(run_dir)]
    cmd += ["cluster.nodes=1", "cluster.gpus_per_node=1", "data.train_url=synthetic://4096", "data.num_workers=2"]
    cmd += ["schedule.max_steps=4", "tracking.log_every=2", "eval.every_steps=1000", "checkpoint.every_steps=1000"]
    cmd += ["deepspeed.global_batch=null", *overrides, *TINY]
    env = {**os.environ, "MLFLOW_TRACKING_URI": _tracking_uri(run_dir)}
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=600)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_huge_on_one_gpu_through_deepspeed_nccl_fits_the_plan(checkpointing: bool, tmp_path: Path) -> None:
    """huge_fcmae (bf16, ZeRO-2) for 4 steps on one GPU through the launcher: the measured peak (allocator) must be
    within 20% of the plan's estimate for a world of one."""
    batch = 4 if REHEARSAL else 32
    overrides = [f"data.batch_size={batch}", f"model.grad_checkpointing={str(checkpointing).lower()}"]
    records = _launch(tmp_path / f"ckpt-{checkpointing}", *overrides)
    assert all(r["loss"] == r["loss"] for r in records)
    cfg = load_config("huge_fcmae", ["cluster.nodes=1", "cluster.gpus_per_node=1", "deepspeed.global_batch=null",
                                      "data.train_url=synthetic://4096", *overrides, *TINY])  # fmt: skip
    planned = make_plan(cfg).memory.total / 2**30
    measured = max(r["peak_mem_gb"] for r in records)
    print(f"{cfg.model.size} bf16 batch {batch} checkpointing={checkpointing}: measured {measured:.2f} GiB, plan "
          f"{planned:.2f} GiB")  # fmt: skip
    if not REHEARSAL:  # a CPU has no allocator peak to hold against the plan
        assert measured == pytest.approx(planned, rel=0.2)


def test_a_cuda_profile_has_kernels_and_a_memory_snapshot_and_gpu_metrics_reach_mlflow(tmp_path: Path) -> None:
    """atto at 224 px on one GPU, steps 2-3 profiled: the trace holds CUDA kernels inside the marked steps, the ops'
    table is by device time, the memory snapshot loads with its allocator segments, and NVML's GPU metrics are in
    the MLflow run."""
    import gzip
    import pickle

    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "profiled"
    _launch(run_dir, "model.size=atto", f"data.batch_size={4 if REHEARSAL else 32}", "tracking.profile_steps=[2,3]",
            "tracking.system_metrics=true", "tracking.system_metrics_interval_s=1")  # fmt: skip
    folder = run_dir / "profile" / "steps_2-3"
    events = json.loads(gzip.decompress((folder / "rank_0.trace.json.gz").read_bytes()))["traceEvents"]
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= {e.get("name") for e in events}
    client = MlflowClient(tracking_uri=_tracking_uri(run_dir))
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    if REHEARSAL:  # what a CPU shows: the marked steps, the ops table, system metrics
        assert "Self CPU" in (folder / "rank_0.ops.txt").read_text()
        assert client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        return
    assert sum(e.get("cat") == "kernel" for e in events) > 100
    assert "Self CUDA" in (folder / "rank_0.ops.txt").read_text()
    snapshot = pickle.loads((folder / "rank_0.memory.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"][0]
    assert client.get_metric_history(run_id, "system/gpu_0_memory_usage_megabytes")
    assert "rank_0.memory.pickle" in {Path(a.path).name for a in client.list_artifacts(run_id, "profile/steps_2-3")}
