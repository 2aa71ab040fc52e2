"""The ConvNeXt V2 family: sizes, FLOPs, timm equivalence, GRN."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.checkpoints import from_timm, to_timm
from models.convnextv2 import GRN, SIZES, build
from tests.support.tensors import randomize_, rel_err

# The paper's table (SPEC section 1): parameters (M) and GFLOPs (multiply-adds) at 224.
PAPER = {
    "atto": (3.7, 0.55),
    "femto": (5.2, 0.78),
    "pico": (9.1, 1.37),
    "nano": (15.6, 2.45),
    "tiny": (28.6, 4.47),
    "base": (89.0, 15.4),
    "large": (198.0, 34.4),
    "huge": (660.0, 115.0),
}
# SPEC: "within 1%" of the table for both; measured, the worst is femto's parameters at +0.64%.
TABLE_TOLERANCE = 0.01


@pytest.mark.parametrize("size", list(SIZES))
def test_params_and_flops_match_the_paper(size: str) -> None:
    with torch.device("meta"):
        model = build(size)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    # torch counts a multiply-add as 2 FLOPs; the paper (fvcore) counts it as 1.
    gflops = counter.get_total_flops() / 2e9
    paper_params, paper_gflops = PAPER[size]
    assert abs(params - paper_params) / paper_params < TABLE_TOLERANCE, f"{size}: {params:.3f}M vs {paper_params}M"
    assert abs(gflops - paper_gflops) / paper_gflops < TABLE_TOLERANCE, f"{size}: {gflops:.4f} vs {paper_gflops} GFLOPs"


@pytest.mark.parametrize("size", ["atto", "tiny"])
def test_outputs_equal_timm_for_the_same_weights(size: str) -> None:
    reference = randomize_(timm.create_model(f"convnextv2_{size}", pretrained=False), seed=1).eval()
    model = build(size).eval()
    model.load_state_dict(from_timm(reference.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert rel_err(ours, theirs) < 1e-5
    # And back: our weights load strictly into timm and give the same logits.
    fresh = timm.create_model(f"convnextv2_{size}", pretrained=False).eval()
    fresh.load_state_dict(to_timm(model.state_dict()), strict=True)
    with torch.no_grad():
        assert rel_err(fresh(x), ours) < 1e-5


def test_grn_normalizes_per_sample_over_space() -> None:
    grn = GRN(4)
    with torch.no_grad():
        grn.gamma.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        grn.beta.copy_(torch.tensor([0.1, 0.0, -0.2, 0.3]))
    x = torch.randn(2, 3, 5, 4)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    expected = grn.gamma * (x * nx) + grn.beta + x
    torch.testing.assert_close(grn(x), expected)
    # Changing sample 1 must not change sample 0: the statistics are per sample.
    y = x.clone()
    y[1] *= 3
    torch.testing.assert_close(grn(y)[0], grn(x)[0])


def test_channels_last_gives_the_same_logits() -> None:
    model = randomize_(build("atto", num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert rel_err(cl, dense) < 1e-5


def test_num_classes_zero_returns_pooled_features() -> None:
    model = build("atto", num_classes=0)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 320)


def test_unknown_size_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="atto, femto"):
        build("gigantic")


def test_drop_path_grows_linearly_to_the_last_block() -> None:
    model = build("atto", drop_path=0.3)
    blocks = [block for stage in model.stages for block in stage.blocks]
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in blocks]
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx([0.3 * i / (len(rates) - 1) for i in range(len(rates))])
