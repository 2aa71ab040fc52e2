"""Continuing FCMAE pretraining from weights that exist (``model.init_from``): the public ConvNeXt V2 releases,
timm's weights, this project's exports and a run's checkpoints.

What a source may be, and what it gives (:func:`read_init` detects it from the keys, not from the name):

- an FCMAE (``encoder.*`` + decoder side): this project's ``export/fcmae.safetensors`` or a run's checkpoint (a
  run directory, its ``checkpoints/step_N``: the newest complete one when the run did not finish), or the official
  FCMAE release (``convnextv2_*_1k_224_fcmae.pt``: MinkowskiEngine kernels, usually no decoder);
- a ConvNeXt V2 classifier or bare encoder: the official dense checkpoints (ImageNet fine-tuned), timm's
  ``convnextv2_*`` weights (``.safetensors``/``.pth``, with or without a head), this project's
  ``export/model.safetensors``. Their final ``norm`` and ``head`` feed a classifier, which pretraining does not
  have: they are left out, and the log says so.

The encoder is loaded exactly (every tensor, every shape, nothing else), or the run is refused before anything is
written, naming the first key that does not fit; a file without a decoder leaves the decoder as a fresh run
initializes it (from the run's seed). The launcher converts the source once into the run directory
(``init/weights.safetensors`` and ``init/source.json``, :func:`prepare_init`), so that every rank and every node
reads a local file in this project's layout; a run that resumes from its own checkpoint never reads either.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from data.storage import join_url, url_to_fs
from models.checkpoints import FCMAE_DECODER, fcmae_layout, foreign_layout, load_foreign, split_fcmae
from models.fcmae import FCMAE
from trainer.config import PretrainConfig
from trainer.export import atomic_write_text
from trainer.run_dir import LATEST, MARKER, RunDir
from trainer.stages.pretrained import PretrainedWeightsError, read_tensors

log = logging.getLogger(__name__)

SETTING = "model.init_from"
WEIGHTS_FILE = "weights.safetensors"
SOURCE_FILE = "source.json"
CLASSIFIER_ONLY = ("norm.", "head.")
"""Keys of a classifier that an FCMAE does not have: the pooled features' norm and the head."""
CLASSIFIER_LAYOUTS = {
    "ours": "this project's encoder",
    "timm": "timm convnextv2",
    "official": "official ConvNeXt V2 (dense)",
}
"""A classifier's or bare encoder's layout (:func:`models.checkpoints.foreign_layout`), in words."""


@dataclass(frozen=True)
class InitWeights:
    """A source converted to :class:`models.fcmae.FCMAE`'s keys."""

    source: str
    """The URL or path as configured."""
    layout: str
    """What the source was, in words."""
    encoder: dict[str, torch.Tensor]
    """Keys of ``FCMAE.encoder``."""
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)
    """Keys of the FCMAE's decoder side; empty when the source has none (the decoder starts fresh)."""
    left_out: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Keys of the source that pretraining does not use (a classifier's norm and head), with their shapes."""

    def describe(self) -> str:
        """One line for the log and the dry run: what is loaded, from where, and what is not."""
        params = sum(v.numel() for v in self.encoder.values())
        decoder = f"decoder {len(self.decoder)} tensors loaded" if self.decoder else "no decoder in it: decoder fresh"
        line = f"{self.layout} from {self.source}: encoder {len(self.encoder)} tensors ({params / 1e6:.2f}M), {decoder}"
        if self.left_out:
            shown = ", ".join(f"{k} {tuple(s)}" for k, s in list(self.left_out.items())[:4])
            more = f" and {len(self.left_out) - 4} more" if len(self.left_out) > 4 else ""
            line += f"; left out (a classifier's, not pretraining's): {shown}{more}"
        return line


def convert(raw: dict[str, Any], source: str, layout_hint: str | None = None) -> InitWeights:
    """A state dict in any supported layout -> :class:`InitWeights` (see the module docstring)."""
    try:
        fcmae = fcmae_layout(raw)
        if fcmae is not None:
            encoder, decoder = split_fcmae(raw)
            layout = layout_hint or ("this project's FCMAE" if fcmae == "ours" else "official FCMAE release")
            return InitWeights(source, layout, encoder, decoder)
        layout = CLASSIFIER_LAYOUTS[foreign_layout(raw)]
        ours = load_foreign(raw)
    except (KeyError, ValueError) as exc:
        raise PretrainedWeightsError(f"{SETTING}={source!r}: {exc}") from exc
    encoder = {k: v for k, v in ours.items() if not k.startswith(CLASSIFIER_ONLY)}
    left_out = {k: tuple(v.shape) for k, v in ours.items() if k.startswith(CLASSIFIER_ONLY)}
    return InitWeights(source, layout_hint or layout, encoder, {}, left_out)


def read_init(source: str) -> InitWeights:
    """Read and convert ``source`` (a file, an export directory, a run directory or one of its checkpoints; local or
    any fsspec URL for files and export directories)."""
    path = Path(source)
    if "://" not in source and path.is_dir():
        return _read_directory(path, source)
    if "://" not in source and not path.exists():
        raise PretrainedWeightsError(
            f"{SETTING}={source!r} does not exist: point it at a weights file, an export or a run directory"
        )
    name = source.split("?", 1)[0].lower()
    if not name.endswith((".safetensors", ".pth", ".pt")):  # a remote export directory
        fs, remote = url_to_fs(source)
        for file in ("fcmae.safetensors", "model.safetensors"):
            if fs.exists(join_url(remote, file)):
                return convert(read_tensors(join_url(source, file), SETTING), source)
        raise PretrainedWeightsError(
            f"{SETTING}={source!r} is neither a weights file (.safetensors, .pth, .pt) nor a directory holding an "
            "export (fcmae.safetensors or model.safetensors)"
        )
    return convert(read_tensors(source, SETTING), source)


def _read_directory(path: Path, source: str) -> InitWeights:
    if (path / MARKER).is_file():
        return _from_checkpoint(path, source)
    if (path / "config.yaml").is_file() and ((path / "export").is_dir() or (path / "checkpoints").is_dir()):
        export = path / "export"
        if (export / "metrics.json").is_file() and (export / "fcmae.safetensors").is_file():
            return convert(read_tensors(str(export / "fcmae.safetensors"), SETTING), source, "this project's FCMAE")
        pointer = path / "checkpoints" / LATEST
        latest = path / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None
        if latest is not None and (latest / MARKER).is_file():
            return _from_checkpoint(latest, source)
        raise PretrainedWeightsError(
            f"{SETTING}={source!r} is a run directory without a finished export or a complete checkpoint"
        )
    for file in ("fcmae.safetensors", "model.safetensors"):
        if (path / file).is_file():
            return convert(read_tensors(str(path / file), SETTING), source)
    raise PretrainedWeightsError(
        f"{SETTING}={source!r} is a directory without weights: expected an export (fcmae.safetensors or "
        "model.safetensors), a run directory or a checkpoint directory (checkpoints/step_N)"
    )


def _from_checkpoint(path: Path, source: str) -> InitWeights:
    """The full-precision weights of one of this project's checkpoints, whatever its ZeRO stage and world size."""
    meta = json.loads((path / MARKER).read_text())
    if int(meta.get("zero_stage", 0) or 0) > 0 or any(path.glob("*optim_states.pt")):  # bf16 ZeRO-0 has fp32 masters
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:  # ZeRO-0 keeps the whole module in one file
        module = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        state = {k: v.float() for k, v in module.items()}
    return convert(dict(state), source, f"this project's FCMAE (checkpoint {path.name})")


def check_fits(init: InitWeights, cfg: PretrainConfig) -> None:
    """Refuse ``init`` unless its encoder (and decoder, when it has one) is exactly the configured FCMAE's: the
    same keys and shapes. Builds the model on the meta device (no memory, no weights)."""
    from trainer.stages.pretrain import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    problems = _mismatches(init.encoder, model.encoder.state_dict(), "encoder.")
    if init.decoder:
        expected = {k: v for k, v in model.state_dict().items() if k.startswith(FCMAE_DECODER)}
        problems += _mismatches(init.decoder, expected, "")
    if not problems:
        return
    hint = ""
    try:
        from models.checkpoints import infer_size

        found = infer_size({**init.encoder, "norm.weight": torch.empty(0)})
        if found != cfg.model.size:
            hint = f"; the file holds ConvNeXt V2-{found} weights: set model.size={found}"
    except (KeyError, ValueError):
        pass
    token = init.decoder.get("mask_token")
    if token is not None and token.shape[1] != cfg.model.decoder_dim:
        hint += f"; the file's decoder is {token.shape[1]} wide: set model.decoder_dim={token.shape[1]}"
    raise PretrainedWeightsError(
        f"{SETTING}={init.source!r} ({init.layout}) does not fit the configured FCMAE (model.size={cfg.model.size}, "
        f"model.block={cfg.model.block}, model.decoder_dim={cfg.model.decoder_dim}): {problems[0]} "
        f"({len(problems)} problem{'s' if len(problems) > 1 else ''}){hint}"
    )


def _mismatches(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str) -> list[str]:
    problems = []  # in the model's order: the first is the earliest layer that does not fit
    for key, value in expected.items():
        if key not in state:
            problems.append(f"missing key {prefix + key!r} {tuple(value.shape)}")
        elif state[key].shape != value.shape:
            shapes = f"{tuple(state[key].shape)} in the file but {tuple(value.shape)} in the model"
            problems.append(f"{prefix + key!r} has shape {shapes}")
    problems += [f"unexpected key {prefix + k!r} {tuple(v.shape)}" for k, v in state.items() if k not in expected]
    return problems


def load_init(cfg: PretrainConfig) -> InitWeights:
    """Read, convert and check ``cfg.model.init_from``."""
    assert cfg.model.init_from
    init = read_init(cfg.model.init_from)
    check_fits(init, cfg)
    return init


def prepare_init(run_dir: Path, init: InitWeights) -> None:
    """Write the converted source into ``run_dir/init/`` (the launcher, after :func:`load_init`, when
    :func:`cached_source` does not name it already)."""
    out = RunDir(run_dir).init
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"encoder.{k}": v.contiguous() for k, v in init.encoder.items()}
    tensors.update({k: v.contiguous() for k, v in init.decoder.items()})
    save_file(tensors, str(out / f".{WEIGHTS_FILE}.tmp"))
    (out / f".{WEIGHTS_FILE}.tmp").replace(out / WEIGHTS_FILE)
    record = {"source": init.source, "layout": init.layout, "left_out": init.left_out, "decoder": bool(init.decoder)}
    atomic_write_text(out / SOURCE_FILE, json.dumps(record, indent=1))  # last: its presence means complete


def _cached_record(run_dir: Path) -> dict[str, Any] | None:
    record = RunDir(run_dir).init / SOURCE_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def cached_source(run_dir: Path) -> str | None:
    """The source whose conversion ``run_dir/init/`` holds, if complete."""
    record = _cached_record(run_dir)
    return None if record is None else record["source"]


def cached_init(cfg: PretrainConfig, run_dir: Path) -> InitWeights:
    """What a rank loads: the launcher's conversion in the run directory (or, in a run directory prepared without
    it, the source read here)."""
    assert cfg.model.init_from
    record = _cached_record(run_dir)
    if record is None or record["source"] != cfg.model.init_from:
        return load_init(cfg)
    encoder, decoder = split_fcmae(load_file(str(RunDir(run_dir).init / WEIGHTS_FILE)))  # stored in our layout
    left_out = {k: tuple(v) for k, v in record["left_out"].items()}
    return InitWeights(record["source"], record["layout"], encoder, decoder, left_out)


def apply_init(model: FCMAE, init: InitWeights) -> None:
    """Load ``init`` into a freshly built FCMAE: the encoder strictly, the decoder side when the source has one."""
    model.encoder.load_state_dict(init.encoder, strict=True)
    if init.decoder:
        missing, unexpected = model.load_state_dict(init.decoder, strict=False)
        assert not unexpected, unexpected
        assert not [k for k in missing if k.startswith(FCMAE_DECODER)], missing
