"""``model.init_from``: every source layout loads exactly into the FCMAE that pretrains, or the run is refused before
anything is written.

Each layout is checked on what carries the signal: the encoder's tensors, and its dense output against an
independent model of the source's layout (timm's own model, the official release's modules in
``tests/support/official.py``), with a reference of another seed as the control the same bound must reject. A
source without a decoder must leave the decoder exactly as a fresh run of the same seed builds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from data.storage import open_url
from models.convnextv2 import build_encoder
from models.fcmae import FCMAE
from tests.support.env import http_server
from tests.support.launch import launch
from tests.support.official import official_decoder, official_model, to_sparse_fcmae_layout
from tests.support.tensors import randomize_, rel_err
from trainer.config import PretrainConfig, load_config
from trainer.export import write_weights
from trainer.stages.continuation import InitWeights, apply_init, load_init
from trainer.stages.pretrain import build_model
from trainer.stages.pretrained import PretrainedWeightsError

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
FCMAE_DECODER = ("proj.", "mask_token", "decoder.", "pred.")


def _cfg(source: Path | str, *overrides: str) -> PretrainConfig:
    cfg = load_config("atto_fcmae", [f"model.init_from={source}", *overrides])
    assert isinstance(cfg, PretrainConfig)
    return cfg


def _fresh(cfg: PretrainConfig) -> FCMAE:
    """The FCMAE as a run builds it before loading anything: seeded with the run's seed."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg)


def _continued(cfg: PretrainConfig) -> tuple[FCMAE, InitWeights]:
    init = load_init(cfg)
    model = _fresh(cfg)
    apply_init(model, init)
    return model.eval(), init


def _features(model: FCMAE) -> torch.Tensor:
    with torch.no_grad():
        return model.encoder(X)


def _assert_decoder_fresh(model: FCMAE, cfg: PretrainConfig) -> None:
    fresh = _fresh(cfg).state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(FCMAE_DECODER):
            assert torch.equal(value, fresh[key]), key


def test_the_official_fcmae_release_loads_its_sparse_encoder_exactly(tmp_path: Path) -> None:
    reference, other = official_model("atto", seed=3), official_model("atto", seed=4)
    path = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": to_sparse_fcmae_layout(reference.state_dict())}, path)
    cfg = _cfg(path)
    model, init = _continued(cfg)
    assert init.layout == "official FCMAE release" and not init.decoder
    assert "no decoder in it: decoder fresh" in init.describe()
    with torch.no_grad():
        expected, control = reference.features(X), other.features(X)
    assert rel_err(_features(model), expected) < 1e-5 < rel_err(_features(model), control)
    _assert_decoder_fresh(model, cfg)


def test_an_official_fcmae_with_its_decoder_is_a_full_continuation(tmp_path: Path) -> None:
    reference = official_model("atto")
    trained = randomize_(FCMAE("atto"), seed=9).state_dict()
    path = tmp_path / "fcmae_with_decoder.pt"
    torch.save({"model": to_sparse_fcmae_layout(reference.state_dict(), official_decoder(trained))}, path)
    model, init = _continued(_cfg(path))
    assert "decoder 15 tensors loaded" in init.describe()
    state = model.state_dict()
    for key, value in trained.items():
        if key.startswith(FCMAE_DECODER):
            assert torch.equal(state[key], value), key
    with torch.no_grad():
        assert rel_err(_features(model), reference.features(X)) < 1e-5


def test_an_official_dense_classifier_loads_without_its_norm_and_head(tmp_path: Path) -> None:
    reference = official_model("atto", num_classes=1000)
    path = tmp_path / "convnextv2_atto_1k_224_ema.pt"
    torch.save({"model": reference.state_dict()}, path)
    cfg = _cfg(path)
    model, init = _continued(cfg)
    assert init.layout == "official ConvNeXt V2 (dense)"
    classifier = {"head.weight": (1000, 320), "head.bias": (1000,), "norm.weight": (320,), "norm.bias": (320,)}
    assert init.left_out == classifier
    with torch.no_grad():
        assert rel_err(_features(model), reference.features(X)) < 1e-5
    _assert_decoder_fresh(model, cfg)


@pytest.mark.parametrize("head", [False, True])
def test_timm_weights_load_exactly_with_or_without_a_head(head: bool, tmp_path: Path) -> None:
    reference = randomize_(timm.create_model("convnextv2_atto", num_classes=10 if head else 0), seed=5).eval()
    control = randomize_(timm.create_model("convnextv2_atto", num_classes=10 if head else 0), seed=6).eval()
    if head:  # timm's own .pth: a pickled state dict
        path = tmp_path / "pytorch_model.pth"
        torch.save(reference.state_dict(), path)
    else:  # the hub's .safetensors of the `.fcmae` tags: no head
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model, init = _continued(_cfg(path))
    assert init.layout == "timm convnextv2"
    assert ("head.weight" in init.left_out) == head
    with torch.no_grad():
        expected, other = reference.forward_features(X), control.forward_features(X)
    assert rel_err(_features(model), expected) < 1e-5 < rel_err(_features(model), other)


def test_this_projects_fcmae_export_continues_encoder_and_decoder(tmp_path: Path) -> None:
    trained = randomize_(FCMAE("atto", decoder_dim=64), seed=11)
    write_weights(tmp_path / "export" / "fcmae.safetensors", trained.state_dict(), {"size": "atto"})
    write_weights(tmp_path / "export" / "model.safetensors", trained.encoder_state_dict(), {"size": "atto"})
    cfg = _cfg(tmp_path / "export", "model.decoder_dim=64")  # the export directory: its fcmae.safetensors
    model, init = _continued(cfg)
    assert init.layout == "this project's FCMAE"
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # Its encoder file alone: the same encoder, a fresh decoder.
    encoder_only = _cfg(tmp_path / "export" / "model.safetensors", "model.decoder_dim=64")
    model, init = _continued(encoder_only)
    assert init.layout == "this project's encoder" and set(init.left_out) == {"norm.weight", "norm.bias"}
    for key, value in trained.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    _assert_decoder_fresh(model, encoder_only)


def test_sources_that_do_not_fit_are_refused_naming_the_key(tmp_path: Path) -> None:
    femto = tmp_path / "femto.pt"
    torch.save({"model": to_sparse_fcmae_layout(official_model("femto").state_dict())}, femto)
    fits = r"'encoder.stem.conv.weight' has shape \(48, 3, 4, 4\).*set model.size=femto"
    with pytest.raises(PretrainedWeightsError, match=fits):
        load_init(_cfg(femto))
    # A classifier head inside an FCMAE: nothing the pretraining model has, so not silently dropped.
    with_head = FCMAE("atto").state_dict() | {"encoder.head.weight": torch.zeros(10, 320)}
    save_file(with_head, str(tmp_path / "fcmae_head.safetensors"))
    with pytest.raises(PretrainedWeightsError, match=r"unexpected key 'encoder.head.weight' \(10, 320\)"):
        load_init(_cfg(tmp_path / "fcmae_head.safetensors"))
    # A decoder of another width than the configured one.
    save_file(FCMAE("atto", decoder_dim=64).state_dict(), str(tmp_path / "narrow.safetensors"))
    narrow = r"'mask_token' has shape \(1, 64, 1, 1\).*set model.decoder_dim=64"
    with pytest.raises(PretrainedWeightsError, match=narrow):
        load_init(_cfg(tmp_path / "narrow.safetensors"))
    save_file({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="cannot tell the layout"):
        load_init(_cfg(tmp_path / "resnet.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_init(_cfg(tmp_path / "missing.pt"))
    # The control: the same model's own weights are accepted.
    save_file(FCMAE("atto").state_dict(), str(tmp_path / "atto.safetensors"))
    load_init(_cfg(tmp_path / "atto.safetensors"))


def test_the_launcher_refuses_a_source_before_writing_and_the_dry_run_says_what_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    femto = tmp_path / "femto.safetensors"
    save_file(build_encoder("femto").state_dict(), str(femto))
    run_dir = tmp_path / "run"
    assert launch(run_dir, f"model.init_from={femto}") == 2
    assert "set model.size=femto" in capsys.readouterr().err
    assert not run_dir.exists()
    reference = randomize_(timm.create_model("convnextv2_atto", num_classes=0), seed=5)
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(timm_file))
    assert launch(run_dir, "--dry-run", f"model.init_from={timm_file}") == 0
    out = capsys.readouterr().out
    assert f"init from         timm convnextv2 from {timm_file}: encoder 136 tensors" in out
    assert "decoder fresh" in out
    assert not run_dir.exists()


@pytest.mark.slow
def test_the_quick_start_continuation_reports_the_probe_at_its_start_and_end(
    det_shards: tuple[str, str],
    fmnist_shards: str,
    fmnist_test_shards: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``demo_fcmae_continue`` (the README's ``make demo-continue``) on the test-sized sets: it continues a full
    FCMAE export on detection canvases and reports the kNN of the encoder it started from next to its final one."""
    export = tmp_path / "demo_fcmae" / "export"
    trained = randomize_(FCMAE("atto"), seed=11)
    write_weights(export / "fcmae.safetensors", trained.state_dict(), {"size": "atto"})
    run_dir = tmp_path / "run"
    code = launch(
        run_dir, f"model.init_from={export}", "model.decoder_dim=512", f"data.train_url={det_shards[0]}",
        "data.batch_size=8", "schedule.max_steps=4", "schedule.decoder_warmup_steps=2", "eval.every_steps=4",
        f"eval.knn_bank_url={fmnist_shards}", f"data.val_url={fmnist_test_shards}", config="demo_fcmae_continue",
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((run_dir / "export" / "metrics.json").read_text())
    start, end, random = metrics["knn_top1_start"], metrics["knn_top1"], metrics["knn_top1_random"]
    assert start != random  # the start probe ran on the loaded encoder, not on the random baseline
    out = capsys.readouterr().out
    assert f"kNN top-1 {end:.1f}% (at start {start:.1f}%, random init {random:.1f}%)" in out
    assert (run_dir / "init" / "source.json").is_file()


def test_sources_load_from_s3_and_http_as_from_disk(s3_bucket: str, tmp_path: Path) -> None:
    """A file on S3 (moto's real S3 API behind s3fs), an export directory on S3, a file over HTTP (a local
    ``http.server``: fsspec's HTTP filesystem, as for https://) give exactly the tensors the same files give on disk."""
    served = tmp_path / "served"
    reference = official_model("atto")
    served.mkdir()
    torch.save({"model": to_sparse_fcmae_layout(reference.state_dict())}, served / "fcmae.pt")
    trained = randomize_(FCMAE("atto"), seed=12)
    write_weights(tmp_path / "export" / "fcmae.safetensors", trained.state_dict(), {"size": "atto"})
    with open_url(f"{s3_bucket}/run/export/fcmae.safetensors", "wb") as f:
        f.write((tmp_path / "export" / "fcmae.safetensors").read_bytes())
    on_disk = load_init(_cfg(tmp_path / "export"))
    on_s3 = load_init(_cfg(f"{s3_bucket}/run/export"))  # the export directory's URL
    assert on_s3.layout == on_disk.layout == "this project's FCMAE"
    for part in ("encoder", "decoder"):
        mine, theirs = getattr(on_disk, part), getattr(on_s3, part)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with http_server(served) as base:
        over_http = load_init(_cfg(f"{base}/fcmae.pt"))
        from_disk = load_init(_cfg(served / "fcmae.pt"))
        assert all(torch.equal(over_http.encoder[k], v) for k, v in from_disk.encoder.items())
        with pytest.raises(PretrainedWeightsError, match="does not exist"):
            load_init(_cfg(f"{base}/convnextv2_atto_1k_224_fcmae.pt"))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_init(_cfg(f"{s3_bucket}/missing/model.safetensors"))
