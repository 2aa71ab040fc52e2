"""State-dict conversion between this project's ConvNeXt V2 layout and foreign ones.

- timm (``convnextv2_*``): ``stem.0/1``, ``stages.i.downsample.0/1``, ``stages.i.blocks.j.{conv_dw, norm,
  mlp.fc1, mlp.grn.weight/bias, mlp.fc2}``, ``head.norm``, ``head.fc``. timm's atto..nano use 1x1 convs for the
  MLP (``conv_mlp``), so their fc weights are 4-D; tiny and up use Linear layers.
- The official release (facebookresearch/ConvNeXt-V2): ``downsample_layers.i.{0,1}``, ``stages.i.j.{dwconv, norm,
  pwconv1, grn.gamma/beta (1,1,1,C), pwconv2}``, ``norm``, ``head``. FCMAE checkpoints hold a sparse encoder
  under ``encoder.`` with MinkowskiEngine tensors (``*.kernel`` of shape (k*k, C) or (k*k, in, out), ``ln`` and
  ``linear`` infixes, (1, C) biases) and a decoder that the classifier does not use.

Every function returns a state dict that :func:`models.convnextv2.build` loads with ``strict=True``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch

from models.convnextv2 import SIZES

StateDict = dict[str, torch.Tensor]

# timm builds atto..nano with 1x1-conv MLPs (4-D weights).
_TIMM_CONV_MLP_SIZES = ("atto", "femto", "pico", "nano")

_TIMM_BLOCK = {
    "conv_dw": "dwconv",
    "norm": "norm",
    "mlp.fc1": "pwconv1",
    "mlp.fc2": "pwconv2",
    "mlp.grn.weight": "grn.gamma",
    "mlp.grn.bias": "grn.beta",
}
_TIMM_TOP = {"stem.0": "stem.conv", "stem.1": "stem.norm", "head.norm": "norm", "head.fc": "head"}


def _unwrap(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the common ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers."""
    for wrapper in ("model", "state_dict", "module"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            return _unwrap(inner)
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("checkpoint holds no tensors; expected a state dict or {'model': state_dict}")
    return tensors


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def _map_block_key(key: str, block_pattern: str, block_table: Mapping[str, str], out_prefix: str) -> str | None:
    match = re.fullmatch(block_pattern, key)
    if match is None:
        return None
    stage, block, rest = match.groups()
    leaf = _rename(rest, block_table)
    if leaf is None:
        return None
    return out_prefix.format(stage=stage, block=block) + leaf


def from_timm(state_dict: Mapping[str, object]) -> StateDict:
    """timm ``convnextv2_*`` state dict -> this project's layout."""
    out: StateDict = {}
    for key, value in _unwrap(state_dict).items():
        new = _rename(key, _TIMM_TOP)
        if new is None and (m := re.fullmatch(r"stages\.(\d+)\.downsample\.([01])\.(\w+)", key)):
            new = f"stages.{m[1]}.downsample.{'norm' if m[2] == '0' else 'conv'}.{m[3]}"
        if new is None:
            new = _map_block_key(
                key, r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", _TIMM_BLOCK, "stages.{stage}.blocks.{block}."
            )
        if new is None:
            raise KeyError(f"unexpected key {key!r} in a timm convnextv2 state dict")
        if new.endswith(("pwconv1.weight", "pwconv2.weight")) and value.ndim == 4:
            value = value.flatten(1)
        out[new] = value
    return out


def infer_size(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name of the size whose stem width and stage depths match a state dict in this project's layout."""
    width = state_dict["stem.conv.weight"].shape[0]
    depths = tuple(
        1
        + max(
            (int(m[1]) for k in state_dict if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))),
            default=-1,
        )
        for i in range(4)
    )
    for name, spec in SIZES.items():
        if spec.dims[0] == width and spec.depths == depths:
            return name
    raise ValueError(f"no ConvNeXt V2 size has stem width {width} and depths {depths}; sizes: {', '.join(SIZES)}")


def to_timm(state_dict: Mapping[str, object], size: str | None = None) -> StateDict:
    """This project's layout -> timm ``convnextv2_{size}`` (size inferred from the weights when not given)."""
    sd = _unwrap(state_dict)
    conv_mlp = (size or infer_size(sd)) in _TIMM_CONV_MLP_SIZES
    top = {v: k for k, v in _TIMM_TOP.items()}
    block = {v: k for k, v in _TIMM_BLOCK.items()}
    out: StateDict = {}
    for key, value in sd.items():
        new = _rename(key, top)
        if new is None and (m := re.fullmatch(r"stages\.(\d+)\.downsample\.(norm|conv)\.(\w+)", key)):
            new = f"stages.{m[1]}.downsample.{0 if m[2] == 'norm' else 1}.{m[3]}"
        if new is None:
            new = _map_block_key(key, r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", block, "stages.{stage}.blocks.{block}.")
        if new is None:
            raise KeyError(f"unexpected key {key!r}: not in this project's ConvNeXt V2 layout")
        if conv_mlp and new.endswith(("mlp.fc1.weight", "mlp.fc2.weight")):
            value = value[:, :, None, None]
        out[new] = value
    return out


def _sparse_kernel_to_dense(kernel: torch.Tensor) -> torch.Tensor:
    """MinkowskiEngine kernel -> dense conv weight, with the official release's axis convention."""
    ks = math.isqrt(kernel.shape[0])
    if ks * ks != kernel.shape[0]:
        raise ValueError(f"sparse kernel with {kernel.shape[0]} offsets is not a square k*k kernel")
    if kernel.ndim == 3:  # (k*k, in, out)
        _, in_dim, out_dim = kernel.shape
        return kernel.permute(2, 1, 0).reshape(out_dim, in_dim, ks, ks).transpose(3, 2).contiguous()
    _, dim = kernel.shape  # depthwise: (k*k, C)
    return kernel.permute(1, 0).reshape(dim, 1, ks, ks).transpose(3, 2).contiguous()


_OFFICIAL_BLOCK = {
    "dwconv": "dwconv",
    "norm": "norm",
    "pwconv1": "pwconv1",
    "pwconv2": "pwconv2",
    "grn": "grn",
}


def _official_key(key: str) -> str | None:
    if m := re.fullmatch(r"downsample_layers\.0\.([01])\.(\w+)", key):
        return f"stem.{'conv' if m[1] == '0' else 'norm'}.{m[2]}"
    if m := re.fullmatch(r"downsample_layers\.(\d)\.([01])\.(\w+)", key):
        return f"stages.{m[1]}.downsample.{'norm' if m[2] == '0' else 'conv'}.{m[3]}"
    if key.startswith(("norm.", "head.")):
        return key
    return _map_block_key(key, r"stages\.(\d+)\.(\d+)\.(.+)", _OFFICIAL_BLOCK, "stages.{stage}.blocks.{block}.")


def from_official(state_dict: Mapping[str, object]) -> StateDict:
    """Official ConvNeXt V2 release (dense classifier or FCMAE sparse pretraining) -> this project's layout.

    An FCMAE checkpoint gives the encoder only (its decoder is dropped) with a freshly initialized ``norm``
    (ones/zeros), which is what the paper's fine-tuning starts from; load it into ``build(size, num_classes=0)``.
    """
    sd = _unwrap(state_dict)
    is_fcmae = any(k.startswith("encoder.") for k in sd)
    out: StateDict = {}
    for key, value in sd.items():
        if is_fcmae:
            if not key.startswith("encoder."):
                continue  # decoder, mask token, prediction head
            key = key[len("encoder.") :]
        # Sparse (MinkowskiEngine) modules wrap their torch module: norm.ln.weight, pwconv1.linear.weight.
        key = re.sub(r"\.(ln|linear)\.(weight|bias)$", r".\2", key)
        if key.endswith(".kernel"):
            key = key[: -len(".kernel")] + ".weight"
            value = _sparse_kernel_to_dense(value)
        new = _official_key(key)
        if new is None:
            raise KeyError(f"unexpected key {key!r} in an official ConvNeXt V2 checkpoint")
        if new.endswith(("grn.gamma", "grn.beta")) or (new.endswith(".bias") and value.ndim != 1):
            value = value.reshape(-1)
        out[new] = value
    if is_fcmae and "norm.weight" not in out:
        width = out["stages.3.blocks.0.pwconv2.weight"].shape[0]
        out["norm.weight"] = torch.ones(width)
        out["norm.bias"] = torch.zeros(width)
    return out


def to_official(state_dict: Mapping[str, object]) -> StateDict:
    """This project's layout -> the official release's dense layout (for tools written against it)."""
    out: StateDict = {}
    for key, value in _unwrap(state_dict).items():
        if m := re.fullmatch(r"stem\.(conv|norm)\.(\w+)", key):
            new = f"downsample_layers.0.{0 if m[1] == 'conv' else 1}.{m[2]}"
        elif m := re.fullmatch(r"stages\.(\d)\.downsample\.(norm|conv)\.(\w+)", key):
            new = f"downsample_layers.{m[1]}.{0 if m[2] == 'norm' else 1}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            new = f"stages.{m[1]}.{m[2]}.{m[3]}"
            if m[3] in ("grn.gamma", "grn.beta"):
                value = value.reshape(1, 1, 1, -1)
        elif key.startswith(("norm.", "head.")):
            new = key
        else:
            raise KeyError(f"unexpected key {key!r}: not in this project's ConvNeXt V2 layout")
        out[new] = value
    return out


FCMAE_DECODER = ("proj.", "mask_token", "decoder.", "pred.")
"""Key prefixes of an FCMAE's decoder side (the 1x1 projection, mask token, decoder blocks, pixel head), the same in
this project's :class:`models.fcmae.FCMAE` and the official release's."""


def fcmae_layout(state_dict: Mapping[str, object]) -> str | None:
    """``"ours"`` or ``"official"`` for an FCMAE state dict (encoder under ``encoder.``), None for any other."""
    sd = _unwrap(state_dict)
    if any(k.startswith("encoder.stem.conv.") for k in sd):
        return "ours"
    if any(k.startswith("encoder.downsample_layers.") for k in sd):
        return "official"
    return None


def split_fcmae(state_dict: Mapping[str, object]) -> tuple[StateDict, StateDict]:
    """An FCMAE state dict (this project's or the official release's, sparse) -> ``(encoder, decoder)`` in the keys
    :class:`models.fcmae.FCMAE` holds: the encoder without the ``encoder.`` prefix, the decoder side as is (empty
    when the file carries none, as the official release's). Keys that are neither are kept on the encoder side, so
    that a strict load names them."""
    sd = _unwrap(state_dict)
    layout = fcmae_layout(sd)
    if layout is None:
        raise ValueError("not an FCMAE state dict: expected encoder.stem.conv.* (ours) or encoder.downsample_layers.*")
    decoder = {k: v for k, v in sd.items() if k.startswith(FCMAE_DECODER)}
    if layout == "ours":
        encoder = {k.removeprefix("encoder."): v for k, v in sd.items() if not k.startswith(FCMAE_DECODER)}
        return encoder, decoder
    encoder = from_official({k: v for k, v in sd.items() if not k.startswith(FCMAE_DECODER)})
    if not any(k.startswith("encoder.norm.") for k in sd):
        encoder = {k: v for k, v in encoder.items() if not k.startswith("norm.")}  # from_official's added norm
    # The official decoder blocks are dense ConvNeXt V2 blocks: only GRN's (1, 1, 1, C) parameters differ.
    decoder = {k: v.reshape(-1) if k.endswith(("grn.gamma", "grn.beta")) else v for k, v in decoder.items()}
    return encoder, decoder


_LAYOUTS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, object]], StateDict]]] = {
    "ours": (("stem.conv.",), _unwrap),
    "timm": (("stem.0.",), from_timm),
    "official": (("downsample_layers.", "encoder."), from_official),
}
"""Each foreign layout: the key prefixes that tell it, and its converter to this project's layout."""


def foreign_layout(state_dict: Mapping[str, object]) -> str:
    """``"ours"``, ``"timm"`` or ``"official"`` (dense or FCMAE), told from the keys of a (wrapped) state dict."""
    sd = _unwrap(state_dict)
    for name, (prefixes, _) in _LAYOUTS.items():
        if any(k.startswith(prefixes) for k in sd):
            return name
    raise ValueError(
        "cannot tell the layout of this checkpoint: expected this project's keys (stem.conv.*), "
        "timm's (stem.0.*) or the official release's (downsample_layers.* / encoder.*)"
    )


def load_foreign(state_dict: Mapping[str, object]) -> StateDict:
    """Detect the layout (ours, timm, official dense or FCMAE) and convert to ours."""
    sd = _unwrap(state_dict)
    return _LAYOUTS[foreign_layout(sd)][1](sd)
