"""Fine-tuning: pretrained weights from every layout, misfits refused, layer-decay groups, evaluation counts, EMA
restored on resume, and a real run on Fashion-MNIST that learns well above chance."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tarfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import timm
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data.loader import IGNORE_LABEL
from data.sources import FashionMNISTSource, SourceSample
from data.write_shards import main as write_main
from data.writer import WriterConfig, write_shards
from models.checkpoints import to_official, to_timm
from models.convnextv2 import build
from models.fcmae import FCMAE
from tests.support.launch import launch, launch_cmd, logged_steps, run, start
from tests.support.tensors import rel_err
from trainer.config import load_config
from trainer.distributed import DistEnv
from trainer.optim import lr_scales, param_groups
from trainer.rendezvous import free_port
from trainer.resilience.preemption import REQUEUE_EXIT_CODE
from trainer.stages.finetune import LABELED_FILE, FinetuneStage, attach_probe, build_model, eval_counts, init_head
from trainer.stages.pretrained import PretrainedWeightsError, load_pretrained

LD = 0.8


@pytest.fixture(scope="module")
def encoder() -> dict[str, torch.Tensor]:
    """An FCMAE encoder export (what the pretraining stage writes), GRN and norm moved off their zero/one init."""
    torch.manual_seed(0)
    weights = FCMAE("atto", decoder_dim=64).encoder_state_dict()
    return {k: (v + 0.01 * torch.randn_like(v)).contiguous() for k, v in weights.items()}


def _layouts(encoder: dict[str, torch.Tensor], root: Path) -> dict[str, str]:
    """The same weights as our export, a timm model's state dict and an official-layout checkpoint."""
    ours = root / "model.safetensors"
    save_file(encoder, str(ours))
    timm_model = timm.create_model("convnextv2_atto", pretrained=False)
    missing, unexpected = timm_model.load_state_dict(to_timm(encoder), strict=False)
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight"] and not unexpected
    torch.save(timm_model.state_dict(), root / "timm.pth")
    torch.save({"model": to_official(encoder)}, root / "official.pt")
    return {
        "ours": str(ours),
        "ours (file:// URL)": f"file://{ours}",
        "timm": str(root / "timm.pth"),
        "official": str(root / "official.pt"),
    }


def _assert_trunk_equals(model: torch.nn.Module, encoder: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert {k for k in state if not k.startswith("head.")} == encoder.keys()
    for key, value in encoder.items():
        assert torch.equal(state[key], value), key


def test_pretrained_weights_load_from_every_layout(encoder: dict[str, torch.Tensor], tmp_path: Path) -> None:
    for source, url in _layouts(encoder, tmp_path).items():
        model = build("atto", num_classes=10)
        load_pretrained(model, url, "atto")
        _assert_trunk_equals(model, encoder)
        assert model.head.weight.shape == (10, 320), source  # the file's 1000-class head (timm) is not used


@pytest.mark.slow
def test_pretrained_weights_load_from_s3(encoder: dict[str, torch.Tensor], s3_bucket: str, tmp_path: Path) -> None:
    save_file(encoder, str(tmp_path / "model.safetensors"))
    url = f"{s3_bucket}/runs/atto_fcmae/export/model.safetensors"
    fsspec.filesystem("s3").put(str(tmp_path / "model.safetensors"), url)
    model = build("atto", num_classes=10)
    load_pretrained(model, url, "atto")
    _assert_trunk_equals(model, encoder)


def test_weights_of_another_size_are_refused(encoder: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(encoder, str(path))
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(build("tiny", num_classes=10), str(path), "tiny")
    message = str(err.value)
    assert str(path) in message and "model.size='tiny'" in message
    assert "'stem.conv.weight' has shape (40, 3, 4, 4) in the file but (96, 3, 4, 4) in the model" in message
    assert "set model.size=atto" in message


def test_missing_and_partial_checkpoints_are_refused(encoder: dict[str, torch.Tensor], tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="does not exist: run the pretraining stage first"):
        load_pretrained(build("atto", num_classes=10), str(tmp_path / "nothing.safetensors"), "atto")
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in encoder.items() if k != "norm.weight"}, str(partial))
    with pytest.raises(PretrainedWeightsError, match=re.escape("missing key 'norm.weight'")):
        load_pretrained(build("atto", num_classes=10), str(partial), "atto")
    with pytest.raises(PretrainedWeightsError, match=re.escape("expected a .safetensors")):
        load_pretrained(build("atto", num_classes=10), str(tmp_path / "weights.npz"), "atto")


def test_head_starts_near_zero() -> None:
    torch.manual_seed(0)
    model = build("atto", num_classes=1000)
    init_head(model, head_init_scale=0.001)
    assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)  # the official fine-tune init
    assert torch.count_nonzero(model.head.bias) == 0


def test_layer_decay_per_block() -> None:
    model = build("atto", num_classes=10)  # atto: 12 blocks, the classifier is layer 13
    assert model.num_layers("block") == 12
    scale = lr_scales(model.layer_ids("block"), 12, LD)
    expected = {
        "stem.conv.weight": 12,  # the stem shares layer 1 with the first block (official code)
        "stages.0.blocks.0.dwconv.weight": 12,
        "stages.0.blocks.1.grn.gamma": 11,
        "stages.1.downsample.norm.weight": 10,  # a downsample goes with its stage's first block
        "stages.1.blocks.0.pwconv1.weight": 10,
        "stages.2.blocks.5.pwconv2.bias": 3,
        "stages.3.downsample.conv.weight": 2,
        "stages.3.blocks.1.norm.weight": 1,
        "norm.weight": 0,
        "head.weight": 0,
    }
    for name, power in expected.items():
        assert scale(name) == pytest.approx(LD**power), name
    with pytest.raises(ValueError, match="no layer id"):
        scale("decoder.0.weight")


def test_layer_decay_grouped_as_the_paper_for_base() -> None:
    with torch.device("meta"):
        model = build("base", num_classes=1000)
    assert model.num_layers("stage") == 12
    ids = model.layer_ids("stage")
    assert ids.keys() == {n for n, _ in model.named_parameters()}  # every parameter has its layer
    assert sorted(set(ids.values())) == list(range(14))
    assert ids["stem.conv.weight"] == 0
    assert ids["stages.0.blocks.2.grn.beta"] == 1
    assert ids["stages.1.downsample.conv.weight"] == ids["stages.1.blocks.2.dwconv.weight"] == 2
    assert ids["stages.2.downsample.conv.weight"] == ids["stages.2.blocks.2.dwconv.weight"] == 3
    assert ids["stages.2.blocks.3.dwconv.weight"] == 4
    assert ids["stages.2.blocks.26.pwconv2.weight"] == 11
    assert ids["stages.3.downsample.conv.weight"] == ids["stages.3.blocks.2.pwconv1.weight"] == 12
    assert ids["head.weight"] == ids["norm.bias"] == 13
    scale = lr_scales(ids, 12, LD)
    assert scale("stem.conv.weight") == pytest.approx(LD**13)
    assert scale("stages.2.blocks.26.pwconv2.weight") == pytest.approx(LD**2)


def test_optimizer_groups_combine_layer_decay_and_no_decay() -> None:
    model = build("atto", num_classes=10)
    groups = param_groups(model, weight_decay=0.05, lr_scale=lr_scales(model.layer_ids("block"), 12, LD))
    by_name = {n: (g["weight_decay"], g["lr_scale"]) for g in groups for n in g["names"]}
    assert by_name.keys() == {n for n, _ in model.named_parameters()}
    assert by_name["stages.2.blocks.3.grn.gamma"] == (0.0, pytest.approx(LD**5))
    assert by_name["stages.2.blocks.3.pwconv1.weight"] == (0.05, pytest.approx(LD**5))
    assert by_name["head.weight"] == (0.05, 1.0)
    assert by_name["head.bias"] == (0.0, 1.0)
    assert len(groups) == 2 * 13  # layer ids 1..13, each with decayed weights and no-decay biases/norms


def test_evaluation_counts_skip_padded_slots() -> None:
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5, 4, 0, 0, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    labels = torch.tensor([0, 2, 0, IGNORE_LABEL])  # the last slot pads the batch
    assert eval_counts(logits, labels).tolist() == [1.0, 2.0, 3.0]  # top-1 hits, top-5 hits, real samples


def test_ema_with_zero3_is_refused(tmp_path: Path) -> None:
    cfg = load_config("demo_finetune", ["deepspeed.zero_stage=3"])
    with pytest.raises(ValueError, match=re.escape("finetune.ema_decay=null")):
        FinetuneStage(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), tmp_path)


def _restore_on_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    from trainer.distributed import init_distributed, teardown

    env = init_distributed()
    overrides = ["data.train_url=synthetic://64", "data.val_url=synthetic://64", "data.batch_size=8"]
    cfg = load_config("demo_finetune", [*overrides, "model.pretrained=null", "data.image_size=32"])
    torch.manual_seed(0)
    stage = FinetuneStage(cfg, env, Path(out))
    assert stage.ema is not None
    saved = {k: torch.full_like(v, 0.5) for k, v in stage.ema.module.state_dict().items()}
    # What the checkpoint holds: the EMA on rank 0 only, the best evaluation on every rank.
    best = {"top1": 61.5, "source": "ema", "step": 40}
    stage.load_state_dict({"best": best, "ema": saved} if rank == 0 else {"best": best})
    restored = all(torch.equal(v, saved[k]) for k, v in stage.ema.module.state_dict().items())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"ema_restored": restored, "best": asdict(stage.best)}))
    teardown()


@pytest.mark.slow
def test_every_rank_restores_the_ema_saved_by_rank_0(tmp_path: Path) -> None:
    mp.spawn(_restore_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"ema_restored": True, "best": {"top1": 61.5, "source": "ema", "step": 40}}, rank


# A real fine-tuning run from scratch on 2 ranks: 768 Fashion-MNIST training images (4 epochs of 24 steps of
# 2 x 16), evaluated on 500 test images (the last evaluation batch is padded). Chance is 10%.
MIN_TOP1 = 50.0


@pytest.mark.slow
def test_finetune_learns_fashion_mnist(fmnist_shards: str, fmnist_test_shards: str, tmp_path: Path) -> None:
    code = launch(
        tmp_path, f"data.train_url={fmnist_shards}", f"data.val_url={fmnist_test_shards}", "data.batch_size=16",
        "model.pretrained=null", "optim.base_lr=8e-3", "schedule.epochs=4", "schedule.max_steps=96",
        "eval.every_steps=1000", ranks=2, config="demo_finetune",
    )  # fmt: skip
    assert code == 0
    export = tmp_path / "export"
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["steps"] == 96 and metrics["val_images"] == 500  # padded slots are not counted
    assert max(metrics["top1"], metrics["ema_top1"]) >= MIN_TOP1, metrics
    assert metrics["top5"] > metrics["top1"] and metrics["best_top1"] >= max(metrics["top1"], metrics["ema_top1"])
    model = build("atto", num_classes=10)
    model.load_state_dict(load_file(str(export / "model.safetensors")))  # strict: the next stage can load it
    model.load_state_dict(load_file(str(export / "ema.safetensors")))
    with safe_open(str(export / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["source"] in ("model", "ema") and int(meta["step"]) in (24, 48, 72, 96)  # evaluated every epoch
    assert float(meta["top1"]) == pytest.approx(metrics["best_top1"], abs=1e-3)


@pytest.mark.slow
def test_ema_is_restored_on_resume(tmp_path: Path) -> None:
    decay = 0.5  # a fast EMA: a restarted one would be far from the restored one after a step
    common = (
        "data.val_url=synthetic://64",
        "data.batch_size=8",
        "model.pretrained=null",
        "optim.base_lr=0.3",  # large steps: weights move well beyond float tolerance in 3 steps
        f"finetune.ema_decay={decay}",
    )
    assert launch(tmp_path, *common, "schedule.max_steps=3", config="demo_finetune") == 0
    first = {name: load_file(str(tmp_path / "export" / f"{name}.safetensors")) for name in ("model", "ema")}
    assert launch(tmp_path, *common, "schedule.max_steps=4", config="demo_finetune") == 0
    assert [r["step"] for r in logged_steps(tmp_path)] == [1, 2, 3, 4]  # resumed at step 3, not restarted
    model = load_file(str(tmp_path / "export" / "model.safetensors"))
    ema = load_file(str(tmp_path / "export" / "ema.safetensors"))
    for key, value in ema.items():
        restored = decay * first["ema"][key] + (1 - decay) * model[key]
        torch.testing.assert_close(value, restored, rtol=0, atol=1e-6)
    restarted = {k: decay * first["model"][k] + (1 - decay) * model[k] for k in ema}
    assert any(not torch.allclose(ema[k], restarted[k], atol=1e-4) for k in ema)


def _members(shard_set: Path) -> list[str]:
    names = []
    for tar in sorted(shard_set.glob("*.tar")):
        with tarfile.open(tar) as archive:
            names += [m.name for m in archive.getmembers() if m.name.endswith(".cls")]
    return names


class _ShuffledLabels:
    """A Fashion-MNIST source whose labels are those of other images (a fixed permutation): nothing to learn."""

    kind = "fashion-mnist"

    def __init__(self, base: FashionMNISTSource) -> None:
        self.base = base
        self.perm = np.random.default_rng(0).permutation(len(base))

    def __len__(self) -> int:
        return len(self.base)

    def load(self, index: int) -> SourceSample:
        other = int(self.base.labels[self.base.indices[self.perm[index]]])
        return dataclasses.replace(self.base.load(index), label=other)

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "labels": "shuffled"}


@pytest.mark.slow
def test_a_linear_probe_learns_separable_features_not_shuffled_labels_and_leaves_the_trunk(
    fmnist_shards: str, fmnist_test_shards: str, tmp_path: Path
) -> None:
    """The probe (``finetune.linear_probe``, ``demo_linprobe``) on a random-init trunk: Fashion-MNIST's pooled
    features are linearly separable far above chance, the same images with shuffled labels are not; the trunk ends
    exactly as built; the export (BatchNorm folded into the head) gives the probe's logits."""
    shuffled = tmp_path / "shuffled"
    base = FashionMNISTSource(split="train", image_size=64)  # the same 768 images as fmnist_shards, other labels
    config = WriterConfig(output=str(shuffled), samples_per_shard=128, limit=768, progress=False)
    write_shards(_ShuffledLabels(base), config)
    common = [f"data.val_url={fmnist_test_shards}", "data.batch_size=32", "model.pretrained=null", "schedule.epochs=2",
              "schedule.max_steps=48", "eval.every_steps=1000", "checkpoint.every_steps=48"]  # fmt: skip
    top1 = {}
    for name, train in (("separable", fmnist_shards), ("shuffled", str(shuffled))):
        run_dir = tmp_path / name
        assert launch(run_dir, f"data.train_url={train}", *common, config="demo_linprobe") == 0
        top1[name] = json.loads((run_dir / "export" / "metrics.json").read_text())["top1"]
    print("linear probe top-1:", top1)
    assert top1["separable"] >= 45.0 and top1["shuffled"] <= 20.0, top1  # chance: 10%
    assert not (tmp_path / "separable" / LABELED_FILE).exists()  # a full set: its labels are its shards'

    # A few-label set (3 per class, carved by the writer): every labeled sample is listed in the run directory.
    few = tmp_path / "few"
    write_main(["--source", "fashion-mnist", "--image-size", "64", "--per-class", "3", "--shuffle-seed", "4",
                "--output", str(few), "--quiet"])  # fmt: skip
    assert launch(tmp_path / "few_run", f"data.train_url={few}", *common[:-3], "data.batch_size=10",
                  "schedule.max_steps=2", config="demo_linprobe") == 0  # fmt: skip
    listed = [json.loads(line) for line in (tmp_path / "few_run" / LABELED_FILE).read_text().splitlines()]
    assert sorted(r["label"] for r in listed) == [c for c in range(10) for _ in range(3)]
    assert {r["key"] for r in listed} == {name.split(".")[0] for name in _members(few)}

    run_dir = tmp_path / "separable"
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    torch.manual_seed(0)  # the run's seed: the trunk as the stage built it
    built = build("atto", num_classes=10).state_dict()
    assert exported.keys() == built.keys()  # the plain classifier's layout: the next stage loads it
    trunk = [k for k in built if not k.startswith("head.")]
    assert all(torch.equal(exported[k], built[k]) for k in trunk)
    assert not torch.equal(exported["head.weight"], built["head.weight"])
    # The probe as trained (the last checkpoint's module: BatchNorm, then the head) against the folded export.
    saved = torch.load(run_dir / "checkpoints" / "step_00000048" / "mp_rank_00_model_states.pt", weights_only=False)
    probe = build("atto", num_classes=10)
    attach_probe(probe)
    probe.load_state_dict(saved["module"])
    folded = build("atto", num_classes=10)
    folded.load_state_dict(exported)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(folded.eval()(x), probe.eval()(x)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_a_resumed_probe_takes_its_frozen_trunk_from_the_checkpoint_not_the_source(
    encoder: dict[str, torch.Tensor], fmnist_shards: str, tmp_path: Path, zero_stage: int
) -> None:
    """A linear probe from pretrained weights (2 ranks), preempted at step 2 of 4; its source is then gone (a
    bucket that became unreachable). The resume does not read it: the frozen trunk, the head and its BatchNorm come
    from the checkpoint, and the run ends at the uninterrupted run's weights, bit for bit. Control: the probe of a
    random trunk ends elsewhere under the same comparison."""
    source = tmp_path / "pretrained" / "model.safetensors"
    source.parent.mkdir()
    save_file(encoder, str(source))

    def cmd(run_dir: Path, pretrained: str) -> list[str]:
        return launch_cmd(
            run_dir, f"data.train_url={fmnist_shards}", "data.val_url=synthetic://16", "data.batch_size=8",
            "schedule.max_steps=4", "checkpoint.every_steps=1000", f"deepspeed.zero_stage={zero_stage}",
            f"model.pretrained={pretrained}", ranks=2, config="demo_linprobe",
        )  # fmt: skip

    assert run(cmd(tmp_path / "uninterrupted", str(source))) == 0
    assert run(cmd(tmp_path / "random", "null")) == 0
    resumed = tmp_path / "resumed"
    log = tmp_path / "segment-1.log"
    assert start(cmd(resumed, str(source)), log, fault="step@2=preempt").wait(timeout=300) == REQUEUE_EXIT_CODE
    source.rename(source.with_suffix(".gone"))
    log = tmp_path / "segment-2.log"
    assert start(cmd(resumed, str(source)), log).wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text()

    def weights(run_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run_dir / "export" / "model.safetensors"))

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    reference = weights(tmp_path / "uninterrupted")
    assert all(torch.equal(reference[k], encoder[k]) for k in encoder)  # the trunk stayed as loaded
    assert same(weights(resumed), reference)
    assert not same(weights(tmp_path / "random"), reference)


def test_the_v1_ablations_encoder_fine_tunes_in_a_v1_classifier(tmp_path: Path) -> None:
    """``model.block=v1`` builds the classifier of the paper's V1 ablation (LayerScale, no GRN): its FCMAE encoder
    loads into it exactly, and a V2 classifier refuses it, naming the GRN it lacks."""
    fcmae = FCMAE("atto", decoder_dim=64, block="v1")
    path = tmp_path / "model.safetensors"
    save_file(fcmae.encoder_state_dict(), str(path))
    cfg = load_config("demo_finetune", ["model.block=v1", f"model.pretrained={path}"])
    model = build_model(cfg)  # type: ignore[arg-type]
    load_pretrained(model, str(path), "atto")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fcmae.encoder.state_dict().items())
    with pytest.raises(PretrainedWeightsError, match=r"grn\.gamma"):
        load_pretrained(build("atto", num_classes=10), str(path), "atto")
