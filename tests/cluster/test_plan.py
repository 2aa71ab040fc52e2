"""``--dry-run``: the plan of ``huge_fcmae`` on 16 nodes, checked number by number."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cluster.launch import main
from cluster.plan import GiB, checkpoint_line, format_plan, make_plan
from models.convnextv2 import SIZES
from trainer.config import load_config
from trainer.observability.metrics import count_fcmae_flops
from trainer.resilience.checkpoint import checkpoint_bytes
from trainer.stages.pretrain import build_model


def _gather_fcmae_saved_bytes(size: str, batch: int, image: int, mask_ratio: float) -> float:
    """fp32 bytes autograd saves in one FCMAE step of the ``gather`` backend, counted by hand (encoder blocks only).

    A block at width C on an h x w grid with t visible cells saves the zero-filled dwconv input (C*h*w), the
    visible tokens three times (index_copy source, LayerNorm input, pwconv1 input: 3*t*C) and the 4C-wide hidden
    five times (GELU input, GRN norm input, GRN x and x*Nx, pwconv2 input: 20*t*C): C*(h*w + 23*t) floats. The
    weights that convs and linears save are the parameters, not activations. Stem, downsampling layers, decoder and
    loss are left out (about 4% at huge, 224 px).
    """
    spec = SIZES[size]
    patches = (image // 32) ** 2
    visible_patches = int(patches * (1 - mask_ratio))
    floats = 0
    for i, (depth, dim) in enumerate(zip(spec.depths, spec.dims, strict=True)):
        side = image // 4 >> i
        cells_per_patch = (side * side) // patches
        floats += depth * dim * (side * side + 23 * visible_patches * cells_per_patch)
    return 4.0 * batch * floats


def test_huge_on_16_nodes_plan_numbers() -> None:
    plan = make_plan(load_config("huge_fcmae", ["cluster.nodes=16"]))
    assert (plan.world_size, plan.nodes, plan.ranks_per_node) == (128, 16, 8)
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (32, 1, 4096)
    assert plan.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert plan.dataset_size == 1_281_167
    assert plan.steps_per_epoch == 1_281_167 // 4096 == 312
    assert plan.total_steps == 312 * 800
    assert 655e6 < plan.num_params < 670e6  # 660M encoder + the 512-wide decoder
    m = plan.memory
    # ZeRO-2, bf16: 2-byte weights on every GPU; gradients and fp32 master+Adam (14 B) split over 128 GPUs.
    assert m.params == pytest.approx(plan.num_params * 2)
    assert m.grads == pytest.approx(plan.num_params * 2 / 128)
    assert m.optimizer == pytest.approx(plan.num_params * 12 / 128)
    # Activations: the planner measures 15.84 GiB saved by 32 images at 224 px in fp32 (the weights that ops save for
    # backward left out: they are the parameters) and halves it for bf16 (7.92 GiB); counted by hand, 15.17 GiB of
    # block activations in fp32: the stem, downsampling and decoder that the count leaves out make up the 4.4% gap.
    # A planner that re-counted the weights (+2.47 GiB fp32), did not halve for bf16 or counted masked cells as
    # visible misses this by far more than 5%.
    by_hand = _gather_fcmae_saved_bytes("huge", 32, 224, 0.6)
    assert m.activations == pytest.approx(by_hand / 2, rel=0.05), (m.activations / GiB, by_hand / 2 / GiB)
    assert m.total < 80 * GiB  # fits an 80 GB H100
    assert "--nodes=16" in plan.sbatch and "--gpus-per-node=8" in plan.sbatch
    assert "--signal=USR2@120" in plan.sbatch and "--requeue" in plan.sbatch


def test_the_dry_run_checks_that_a_save_fits_the_preemption_window() -> None:
    """huge in bf16 checkpoints 14 bytes per parameter (weights, fp32 master, two AdamW moments): 9.3 GB, 9 s at
    1 GB/s in a 120 s window; at 50 MB/s the save would outlast the window (the trainer's own test checks the
    estimate against a real checkpoint's size)."""
    cfg = load_config("huge_fcmae", ["cluster.nodes=16"])
    num_params = make_plan(cfg).num_params
    assert checkpoint_bytes(num_params, "bf16", 2) == num_params * 14
    assert re.search(
        r"checkpoint +9\.3 GB, ~9s to save at 1000 MB/s .*: fits in the 120s", checkpoint_line(cfg, num_params)
    )
    slow = load_config("huge_fcmae", ["cluster.nodes=16", "checkpoint.write_mb_per_s=50"])
    assert "~186s to save at 50 MB/s (checkpoint.write_mb_per_s): DOES NOT FIT" in checkpoint_line(slow, num_params)


def test_zero_stage_changes_the_memory_split() -> None:
    base = ["cluster.nodes=16"]
    zero1 = make_plan(load_config("huge_fcmae", [*base, "deepspeed.zero_stage=1"])).memory
    zero3 = make_plan(load_config("huge_fcmae", [*base, "deepspeed.zero_stage=3"])).memory
    assert zero1.grads == pytest.approx(zero3.grads * 128)
    assert zero3.params == pytest.approx(zero1.params / 128)


def test_dry_run_prints_the_plan_without_submitting(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["--config", "huge_fcmae", "--nodes", "16", "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "world size        128 = 16 nodes x 8 GPUs" in out
    assert "4096 global" in out and "249,600 total" in out
    assert not (tmp_path / "r").exists()


def test_dry_run_rejects_a_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "huge_fcmae", "--dry-run", "optim.lr=1"]) == 2
    assert "unknown config key 'optim.lr'" in capsys.readouterr().err


def test_fine_tune_and_detection_plans_count_their_own_models() -> None:
    finetune = make_plan(load_config("base_finetune"))
    assert finetune.params_note == "classifier"
    assert 88e6 < finetune.num_params < 90e6  # ConvNeXt V2-B with a 1000-class head (paper: 89M)
    detection = make_plan(load_config("base_maskrcnn"))
    assert detection.dataset_size == 118_287
    assert "backbone" in detection.params_note


def test_activation_checkpointing_shrinks_the_planned_activations() -> None:
    """A checkpointed stage keeps its blocks' inputs, plus one recomputed block at a time in backward."""
    acts = {}
    for flags in ("false", "[false,false,true,true]", "true"):
        plan = make_plan(load_config("huge_fcmae", ["cluster.nodes=16", f"model.grad_checkpointing={flags}"]))
        acts[flags] = plan.memory.activations / GiB
    assert acts["true"] < acts["[false,false,true,true]"] < acts["false"]
    assert 0.1 < acts["true"] / acts["false"] < 0.25, acts  # measured: 1.2 of 7.9 GiB


def test_a_chained_stage_is_submitted_with_every_parameter_of_a_first_one() -> None:
    from cluster.slurm import slurm_parameters

    cfg = load_config("huge_fcmae", ["cluster.nodes=16", "cluster.partition=gpu", "cluster.account=vision"])
    first, chained = slurm_parameters(cfg), slurm_parameters(cfg, after_job="4242")
    extra = chained["slurm_additional_parameters"].pop("dependency")
    assert extra == "afterok:4242" and chained == first
    assert "dependency" not in slurm_parameters(cfg)["slurm_additional_parameters"]  # nothing leaks between calls


def test_a_node_range_plan_lists_every_count_and_estimates_time_and_cost(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config("huge_fcmae", ["cluster.nodes=16", "cluster.min_nodes=12"])
    plan = make_plan(cfg)
    rows = {row.nodes: row for row in plan.node_rows}
    assert list(rows) == [12, 13, 14, 15, 16]
    assert rows[16].split == (32, 1) and all(rows[n].split is None for n in (12, 13, 14, 15))  # 4096 = 2^12
    text = format_plan(cfg, plan)
    assert "node range        12-16 nodes" in text and re.search(r"13\s+104\s+refused at start", text)
    # SLURM's range, with no per-node task count in the allocation (that would pin it to 12 nodes): srun starts
    # the 8 ranks of each node it got, on the CPUs --mincpus asked for.
    assert "--nodes=12-16" in plan.sbatch and "--mincpus=80" in plan.sbatch
    assert not any(option.startswith("--ntasks-per-node") for option in plan.sbatch)
    # A global batch chosen for the range: every count runs, with the micro-batch each can use.
    chosen = load_config("huge_fcmae", ["cluster.nodes=16", "cluster.min_nodes=15", "deepspeed.global_batch=3840",
                                        "data.batch_size_choices=[15]"])  # fmt: skip
    assert [(r.nodes, r.split) for r in make_plan(chosen).node_rows] == [(15, (32, 1)), (16, (15, 2))]
    # FLOPs counted on the meta device are what the trainer counts on a real model (its MFU's numerator).
    atto = load_config("atto_fcmae", ["data.image_size=64"])
    torch.manual_seed(0)
    real = count_fcmae_flops(build_model(atto), 64, torch.device("cpu")).masked
    assert make_plan(atto).flops_per_sample == pytest.approx(real, rel=1e-6)
    # Time at the assumed MFU on 16 nodes: global batch x FLOPs per sample / (GPUs x peak x MFU) per step.
    mfu, source = plan.mfu
    assert (mfu, source) == (0.35, "assumed: cluster.assumed_mfu")
    step_s = 4096 * plan.flops_per_sample / (128 * 989e12 * 0.35)
    assert f"{3600 / step_s:,.0f} steps/hour" in text
    assert f"{plan.total_steps * step_s / 3600 * 128:,.0f} GPU-hours" in text
    assert re.search(r"12 nodes\s+refused at start", text)
    # A run directory's last segment replaces the assumption with its measured MFU (the median of its steps).
    (tmp_path / "segments.jsonl").write_text(
        json.dumps({"resumed_from": None}) + "\n" + json.dumps({"resumed_from": "step_00000020"}) + "\n"
    )
    records = [{"kind": "train", "step": s, "mfu_pct": pct} for s, pct in [(10, 80.0), (20, 80.0), (30, 21.0),
               (40, 20.0), (50, 22.0)]]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    measured = make_plan(cfg, tmp_path)
    assert measured.mfu[0] == pytest.approx(0.21) and "median of 3 logged steps" in measured.mfu[1]
    assert f"{3600 / (step_s * 0.35 / 0.21):,.0f} steps/hour" in format_plan(cfg, measured)
