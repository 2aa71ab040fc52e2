"""The ``minkowski`` encoder backend: true sparse convolutions with MinkowskiEngine.

Imported only when that backend is chosen. The convolutions reuse the weights of the dense encoder's
``nn.Conv2d`` modules (converted with the official release's kernel convention), so the three backends share
one set of parameters. GRN statistics are per sample, like the dense model: rows are kept sorted by
(sample, row, column), and every sample has the same number of visible cells.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from MinkowskiEngineBackend._C import ConvolutionMode

from models.convnextv2 import ConvNeXtV2Encoder
from models.masking import visible_rows


def _coordinates(rows: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flat NHWC row indices -> ``[batch, y, x]`` int32 coordinates."""
    b, rest = rows // (h * w), rows % (h * w)
    return torch.stack([b, rest // w, rest % w], dim=1).int()


def _depthwise(st: ME.SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Sparse depthwise conv with a dense ``(C, 1, k, k)`` weight; keeps the input's row order."""
    ks = weight.shape[-1]
    kernel = weight.transpose(3, 2).reshape(weight.shape[0], -1).t()  # (k*k, C), offset dy fastest
    gen = ME.KernelGenerator(kernel_size=ks, stride=1, dilation=1, dimension=st.D)
    region_type, region_offset, _ = gen.get_kernel(st.tensor_stride, False)
    manager, key = st.coordinate_manager, st.coordinate_map_key
    kernel_map = manager.kernel_map(
        key, key, gen.kernel_stride, gen.kernel_size, gen.kernel_dilation, region_type=region_type,
        region_offset=region_offset,
    )  # fmt: skip
    out = st.F.new_zeros(st.F.shape)
    for offset, in_out in kernel_map.items():
        in_out = in_out.long().to(st.F.device)
        out = out.index_add(0, in_out[1], st.F[in_out[0]] * kernel[offset])
    return out if bias is None else out + bias


def _strided_conv(
    st: ME.SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse strided conv with a dense ``(out, in, k, k)`` weight; returns features and output coordinates."""
    out_dim, in_dim, ks = weight.shape[0], weight.shape[1], weight.shape[-1]
    kernel = weight.transpose(3, 2).reshape(out_dim, in_dim, -1).permute(2, 1, 0).contiguous()
    gen = ME.KernelGenerator(kernel_size=ks, stride=stride, dilation=1, dimension=st.D)
    out_key = ME.CoordinateMapKey(st.coordinate_map_key.get_coordinate_size())
    features = ME.MinkowskiConvolutionFunction.apply(
        st.F, kernel, gen, ConvolutionMode.DEFAULT, st.coordinate_map_key, out_key, st.coordinate_manager
    )
    if bias is not None:
        features = features + bias
    coords = st.coordinate_manager.get_coordinates(out_key)
    return features, coords


def encode_minkowski(
    encoder: ConvNeXtV2Encoder, imgs: torch.Tensor, mask: torch.Tensor, grid_h: int, grid_w: int, keep: int
) -> torch.Tensor:
    """Sparse encoder: stem dense (as the official code), then every stage on MinkowskiEngine sparse tensors."""
    n = imgs.shape[0]
    x = encoder.stem(imgs)
    c, h, w = x.shape[1:]
    rows = visible_rows(mask, grid_h, grid_w, h // grid_h, keep)
    tokens = x.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, rows)
    for stage in encoder.iter_stages():
        if stage.downsample is not None:
            norm, conv = stage.downsample.norm, stage.downsample.conv
            tokens = F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            st = ME.SparseTensor(tokens, coordinates=_coordinates(rows, h, w), device=str(tokens.device))
            features, coords = _strided_conv(st, conv.weight, conv.bias, stride=2)
            h, w = h // 2, w // 2
            coords = coords.long().to(tokens.device)
            # Strided outputs come in an internal order: sort back to (sample, row, column).
            rows_unsorted = coords[:, 0] * (h * w) + (coords[:, 1] // 2) * w + coords[:, 2] // 2
            rows, order = torch.sort(rows_unsorted)
            tokens = features[order]
        base = ME.SparseTensor(tokens, coordinates=_coordinates(rows, h, w), device=str(tokens.device))
        for block in stage.iter_blocks():
            st = ME.SparseTensor(
                tokens, coordinate_map_key=base.coordinate_map_key, coordinate_manager=base.coordinate_manager
            )
            y = _depthwise(st, block.dwconv.weight, block.dwconv.bias)
            y = block.mlp(y.view(n, -1, y.shape[-1])).view(-1, y.shape[-1])
            tokens = tokens + block.drop_path(y.view(n, -1, y.shape[-1])).view(-1, y.shape[-1])
    grid = tokens.new_zeros(n * h * w, tokens.shape[-1]).index_copy(0, rows, tokens)
    return grid.view(n, h, w, -1).permute(0, 3, 1, 2)
