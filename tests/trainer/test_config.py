"""The config system: named configs, extends, overrides, and errors that name the key."""

from __future__ import annotations

import re

import pytest
import yaml

from trainer.config import ConfigError, available_configs, check_runnable, load_config, load_run_config
from trainer.run_dir import prepare_run_dir

SIZES = ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"]


def test_every_size_has_the_papers_pretraining_recipe() -> None:
    assert {f"{s}_fcmae" for s in SIZES} | {"demo_fcmae"} <= set(available_configs())
    for size in SIZES:
        cfg = load_config(f"{size}_fcmae")
        assert cfg.model.size == size
        assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.betas) == (1.5e-4, 0.05, (0.9, 0.95))
        assert (cfg.model.mask_ratio, cfg.model.decoder_depth, cfg.model.decoder_dim) == (0.6, 1, 512)
        assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (800, 40)
        world = cfg.world_size()
        assert cfg.global_batch(world) == 4096
        assert cfg.lr(world) == pytest.approx(1.5e-4 * 4096 / 256)


def test_overrides_are_typed_and_merge_into_sections() -> None:
    cfg = load_config("demo_fcmae", ["optim.base_lr=3e-4", "deepspeed.zero_stage=2", "model.backend=dense_masked"])
    assert cfg.optim.base_lr == 3e-4
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.model.backend == "dense_masked"
    assert cfg.model.size == "atto"  # inherited through extends: atto_fcmae -> _fcmae


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; allowed keys in optim: base_lr"),
        ("modle.size=atto", "unknown config key 'modle'"),
        ("model.size=gigantic", "model.size: Input should be 'atto'"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        ("data.image_size=100", "data.image_size=100 must be a multiple of 32"),
        ("optim.base_lr", "must look like section.key=value"),
        ('data.train_url=""', "data.train_url is empty: set it to a shard set"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("demo_fcmae", [override])


def test_unknown_config_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="available: atto_fcmae"):
        load_config("hgue_fcmae")


def test_global_batch_mismatch_names_the_settings() -> None:
    cfg = load_config("huge_fcmae")
    with pytest.raises(ConfigError, match=r"deepspeed.global_batch=4096 but data.batch_size=32 .* world size 64"):
        cfg.global_batch(64)


def test_a_run_dir_refuses_a_different_training_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert prepare_run_dir(load_config("demo_fcmae"), tmp_path) is False
    # Nothing trained yet (a run that failed at start-up): the corrected config replaces the stored one.
    assert prepare_run_dir(load_config("demo_fcmae", ["optim.base_lr=0.002"]), tmp_path) is True
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    # Cluster resources may change between restarts; what is trained may not.
    assert prepare_run_dir(load_config("demo_fcmae", ["cluster.nodes=2", "optim.base_lr=0.002"]), tmp_path) is True
    with pytest.raises(ConfigError, match=r"optim.base_lr: 0.002 -> 0.01"):
        prepare_run_dir(load_config("demo_fcmae", ["optim.base_lr=0.01"]), tmp_path)


def test_a_mask_that_leaves_no_visible_patch_is_refused_before_anything_is_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cluster.launch import main

    run_dir = tmp_path / "run"
    args = ["--config", "demo_fcmae", "--local", "--run-dir", str(run_dir), "data.image_size=64"]
    assert main([*args, "model.mask_ratio=0.9", "--dry-run"]) == 2  # the dry run sees the rule too
    assert main([*args, "model.mask_ratio=0.9"]) == 2
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match=r"model.mask_ratio=0.9 leaves no visible patch of the 4 at "
                                          r"data.image_size=64: lower model.mask_ratio below 0.75"):  # fmt: skip
        load_config("demo_fcmae", ["data.image_size=64", "model.mask_ratio=0.9"])
    load_config("demo_fcmae", ["data.image_size=64", "model.mask_ratio=0.7"])  # control: one patch stays visible


def test_a_key_of_another_stage_is_refused_by_name() -> None:
    refused = {
        ("demo_fcmae", "finetune.layer_decay=0.8"): "finetune.layer_decay: only stage finetune reads it; this "
        "config's stage is pretrain",
        ("demo_fcmae", "model.num_classes=10"): "model.num_classes: only stage finetune and detection reads it",
        ("demo_finetune", "detection.fpn_channels=64"): "detection.fpn_channels: only stage detection reads it",
        ("demo_finetune", "model.mask_ratio=0.5"): "model.mask_ratio: only stage pretrain reads it",
        ("demo_finetune", "data.min_scale=0.5"): "data.min_scale: only stage pretrain reads it",
        ("demo_maskrcnn", "model.compile=true"): "model.compile: only stage pretrain and finetune reads it",
    }
    for (name, override), message in refused.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(name, [override])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.mask_ration'; allowed keys in model: size"):
        load_config("demo_fcmae", ["model.mask_ration=0.5"])  # a typo is not another stage's key


def test_a_run_stores_and_logs_only_what_its_stage_uses() -> None:
    sections = {name: set(load_config(name).model_dump()) for name in ("demo_fcmae", "demo_finetune", "demo_maskrcnn")}
    common = {"name", "stage", "seed", "data", "optim", "schedule", "deepspeed", "checkpoint", "tracking", "eval"}
    common |= {"watchdog", "cluster", "model"}
    assert sections == {
        "demo_fcmae": common,
        "demo_finetune": common | {"finetune"},
        "demo_maskrcnn": common | {"detection"},
    }
    assert "mask_ratio" not in load_config("demo_finetune").model_dump()["model"]
    assert "num_classes" not in load_config("demo_fcmae").model_dump()["model"]


def test_a_config_stored_by_the_flat_schema_still_resumes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Run directories written before the per-stage schema hold every stage's sections and the evaluation interval
    under tracking: they load as their stage's config, and resuming one is not a config change."""
    cfg = load_config("demo_finetune")
    old = cfg.model_dump(mode="json")
    old["model"].update(mask_ratio=0.6, decoder_dim=512, backend="gather")
    old["data"]["min_scale"] = 0.2
    old["detection"] = {"layer_decay": 0.9, "fpn_channels": 256}
    old["tracking"].update(eval_every=old["eval"]["every_steps"], eval_each_epoch=old["eval"]["each_epoch"])
    del old["eval"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_run_config(tmp_path / "config.yaml") == cfg
    assert prepare_run_dir(cfg, tmp_path) is True


def test_rules_of_where_the_run_goes_are_checked_before_it_starts() -> None:
    cfg = load_config("huge_fcmae")
    check_runnable(cfg, 128, "cuda")  # 16 nodes x 8 GPUs x 32 = 4096
    with pytest.raises(ConfigError, match=r"deepspeed.global_batch=4096 .* world size 1"):
        check_runnable(cfg, 1, "cpu")
    with pytest.raises(ConfigError, match=r"deepspeed.precision=fp16 needs a GPU"):
        check_runnable(load_config("demo_fcmae", ["deepspeed.precision=fp16"]), 1, "cpu")
    check_runnable(load_config("demo_fcmae", ["deepspeed.precision=bf16"]), 1, "cpu")  # bf16 trains on CPU


def test_huge_finetune_has_the_papers_recipe() -> None:
    cfg = load_config("huge_finetune")
    assert (cfg.stage, cfg.model.size, cfg.model.drop_path) == ("finetune", "huge", 0.3)
    assert (cfg.optim.base_lr, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (1.25e-3, 50, 10)
    assert cfg.finetune.layer_decay == 0.75


def test_a_linear_probe_refuses_what_would_change_its_features_or_labels() -> None:
    cfg = load_config("atto_linprobe")  # the recipe: the protocol's settings
    assert cfg.stage == "finetune" and cfg.finetune.linear_probe and cfg.model.drop_path == 0  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"linear_probe .* finetune\.re_prob=0\.25, .*model\.drop_path=0\.1"):
        load_config("atto_finetune", ["finetune.linear_probe=true"])  # the fine-tuning recipe's augmentation
    with pytest.raises(ConfigError, match=r"model\.drop_path=0\.1"):
        load_config("atto_linprobe", ["model.drop_path=0.1"])


def test_a_node_range_keeps_the_global_batch_and_refuses_counts_that_cannot() -> None:
    cfg = load_config("huge_fcmae", ["cluster.nodes=16", "cluster.min_nodes=8"])  # 4096 = 32 x 1 x 128 GPUs
    eight = cfg.fit_world(64)
    assert (eight.data.batch_size, eight.deepspeed.grad_accum, eight.deepspeed.global_batch) == (32, 2, 4096)
    assert eight.lr(64) == cfg.lr(128)  # the lr follows the global batch, which stays
    assert (eight.data.canonical_ranks, eight.data.canonical_batch_size) == (128, 32)  # the sample order's layout
    with pytest.raises(
        ConfigError, match=r"12 node\(s\) x 8 ranks cannot make the global batch 4096.*nearest first: 8, 16"
    ):
        cfg.fit_world(96)
    warning = cfg.check_node_range()
    assert warning is not None and "on 9-15 node(s)" in warning and "counts of the range that can: 8, 16" in warning
    with pytest.raises(ConfigError, match="no count of the range can"):
        load_config("huge_fcmae", ["cluster.nodes=15", "cluster.min_nodes=9"]).check_node_range()
    # A smaller micro-batch from data.batch_size_choices where accumulation alone cannot make it.
    cpu = ["cluster.gpus_per_node=0", "cluster.cpu_ranks_per_node=1", "cluster.nodes=3", "cluster.min_nodes=1",
           "data.batch_size=32", "data.batch_size_choices=[16]", "deepspeed.global_batch=96"]  # fmt: skip
    ranged = load_config("demo_fcmae", cpu)
    assert ranged.check_node_range() is None
    splits = {w: (f.data.batch_size, f.deepspeed.grad_accum) for w in (1, 2, 3) for f in [ranged.fit_world(w)]}
    assert splits == {1: (32, 3), 2: (16, 3), 3: (32, 1)}
    # Without a range the config runs as it is (the global batch check applies).
    assert load_config("demo_fcmae").fit_world(1) == load_config("demo_fcmae")
