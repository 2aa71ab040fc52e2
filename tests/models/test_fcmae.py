"""FCMAE: masking, sparse encoder backends, decoder, loss and the conversion to the dense model."""

from __future__ import annotations

import sys

import pytest
import torch

from models.convnextv2 import GRN, build
from models.fcmae import FCMAE, patchify, unpatchify
from models.masked_encoder import minkowski_available
from models.masking import mask_grid, random_mask
from tests.support.tensors import randomize_, rel_err

TOL = 1e-5


def _model(size: str = "atto", drop_path: float = 0.0, backend: str = "gather") -> FCMAE:
    model = FCMAE(size, decoder_dim=64, backend=backend, drop_path=drop_path)
    return randomize_(model, seed=7)  # type: ignore[return-value]


def _images(n: int = 3, h: int = 96, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_random_mask_keeps_the_same_count_per_sample_and_is_reproducible() -> None:
    mask = random_mask(8, 49, 0.6, torch.Generator().manual_seed(1))
    assert mask.shape == (8, 49)
    assert (mask.sum(dim=1) == 49 - int(49 * 0.4)).all()
    assert torch.equal(mask, random_mask(8, 49, 0.6, torch.Generator().manual_seed(1)))
    assert not torch.equal(mask, random_mask(8, 49, 0.6, torch.Generator().manual_seed(2)))


needs_minkowski = pytest.mark.skipif(not minkowski_available(), reason="MinkowskiEngine is not installed")


@pytest.mark.parametrize(
    ("backend", "size"),
    [("gather", "atto"), ("gather", "tiny"), pytest.param("minkowski", "atto", marks=needs_minkowski)],
)
def test_backend_equals_dense_masked_forward_and_every_gradient(backend: str, size: str) -> None:
    imgs = _images(n=2, h=64, w=96) if size == "tiny" else _images()
    model = _model(size, drop_path=0.2).train()
    mask = model.random_mask(imgs, torch.Generator().manual_seed(3))
    results = {}
    for name in ("dense_masked", backend):
        model.backend = name
        model.zero_grad()
        torch.manual_seed(11)  # the same drop-path draws for both backends
        loss, pred, _ = model(imgs, mask)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), pred.detach(), grads)
    ref_loss, ref_pred, ref_grads = results["dense_masked"]
    loss, pred, grads = results[backend]
    assert rel_err(loss, ref_loss) < TOL
    assert rel_err(pred, ref_pred) < TOL
    assert grads.keys() == ref_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < TOL, name


def test_a_batch_wide_grn_is_outside_the_backend_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control of the backend equality above: the official sparse GRN's batch-wide statistics (instead of
    per sample) move the prediction far beyond TOL, so that tolerance does tell the two apart."""
    imgs = _images()
    model = _model().eval()
    mask = model.random_mask(imgs, torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, reference, _ = model(imgs, mask)

    def batch_wide(self: GRN, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        stats = x if visible is None else x * visible
        gx = torch.linalg.vector_norm(stats, ord=2, dim=tuple(range(0, x.ndim - 1)), keepdim=True)
        return x + torch.addcmul(self.beta, self.gamma, x * gx / (gx.mean(dim=-1, keepdim=True) + self.eps))

    monkeypatch.setattr(GRN, "forward", batch_wide)
    with torch.no_grad():
        _, pred, _ = model(imgs, mask)
    assert rel_err(pred, reference) > 100 * TOL


def _mask_once_after_stem(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The wrong way: zero masked cells after the stem only and run the dense trunk."""
    grid_h, grid_w = model.grid_size(imgs)
    x = model.encoder.stem(imgs)
    x = x * (1 - mask_grid(mask, grid_h, grid_w, x.shape[-2] // grid_h))
    for stage in model.encoder.stages:
        x = stage(x)
    return x


def test_masked_pixels_never_reach_visible_features() -> None:
    model = _model().eval()
    imgs = _images()
    mask = model.random_mask(imgs, torch.Generator().manual_seed(5))
    grid_h, grid_w = model.grid_size(imgs)
    pixel_mask = mask_grid(mask, grid_h, grid_w, 32).bool().expand_as(imgs)
    changed = imgs.clone()
    changed[pixel_mask] = torch.randn(int(pixel_mask.sum())) * 10
    visible = 1 - mask.reshape(-1, 1, grid_h, grid_w)
    with torch.no_grad():
        for backend in ("dense_masked", "gather"):
            model.backend = backend
            before = model.forward_encoder(imgs, mask) * visible
            after = model.forward_encoder(changed, mask) * visible
            assert torch.equal(before, after), backend
        # The check is sensitive: the unmasked trunk does see the masked pixels.
        dense = model.encoder.forward_features(imgs) * visible
        assert rel_err(model.encoder.forward_features(changed) * visible, dense) > 1e-3


def test_masking_once_after_the_stem_is_not_sparse_convolution() -> None:
    model = _model().eval()
    imgs = _images()
    mask = model.random_mask(imgs, torch.Generator().manual_seed(5))
    grid_h, grid_w = model.grid_size(imgs)
    visible = 1 - mask.reshape(-1, 1, grid_h, grid_w)
    with torch.no_grad():
        sparse = model.forward_encoder(imgs, mask) * visible
        naive = _mask_once_after_stem(model, imgs, mask) * visible
    # Empty cells fill up with biases and neighbours after one block and leak into visible ones.
    assert rel_err(naive, sparse) > 1e-2


def test_loss_equals_an_independent_normalized_pixel_mse() -> None:
    """With a zero prediction the loss is the mean square of the normalized targets, (P-1)/P * var/(var+eps) per
    patch: sensitive to the unbiased variance and the eps (a biased variance is off by 1/P = 3e-4)."""
    model = _model().eval()
    with torch.no_grad():
        model.pred.weight.zero_()
        model.pred.bias.zero_()
    imgs = _images(n=2, h=64, w=64) * 1e-3  # small pixel variance: the 1e-6 eps matters too
    mask = model.random_mask(imgs, torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, pred, _ = model(imgs, mask)
    assert not pred.any()

    def independent(unbiased: bool, eps: float) -> float:
        p, total, count = 32, 0.0, 0
        for n in range(2):
            for idx in range(4):
                if mask[n, idx] == 0:
                    continue
                r, c = divmod(idx, 2)
                patch = imgs[n, :, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(1, 2, 0).reshape(-1).double()
                target = (patch - patch.mean()) / torch.sqrt(patch.var(unbiased=unbiased) + eps)
                total += float((target**2).mean())
                count += 1
        return total / count

    assert loss.item() == pytest.approx(independent(unbiased=True, eps=1e-6), rel=1e-6)
    # Negative controls: the biased variance, or no eps, give another loss.
    assert loss.item() != pytest.approx(independent(unbiased=False, eps=1e-6), rel=1e-6)
    assert loss.item() != pytest.approx(independent(unbiased=True, eps=0.0), rel=1e-6)


def test_patchify_is_row_major_with_row_column_channel_values() -> None:
    imgs = _images(n=1, h=64, w=96)
    patches = patchify(imgs, 32)
    assert patches.shape == (1, 6, 32 * 32 * 3)
    # Patch 4 is row 1, column 1; its value index (row 2, column 3, channel 1) is 2*32*3 + 3*3 + 1.
    assert patches[0, 4, 2 * 96 + 3 * 3 + 1] == imgs[0, 1, 32 + 2, 32 + 3]
    assert torch.equal(unpatchify(patches, 32, 2, 3), imgs)


@pytest.mark.parametrize("hw", [(32, 96), (64, 96), (160, 64)])
def test_any_size_divisible_by_32_works(hw: tuple[int, int]) -> None:
    model = _model()
    imgs = _images(n=2, h=hw[0], w=hw[1])
    loss, pred, mask = model(imgs)
    num_patches = hw[0] // 32 * hw[1] // 32
    assert pred.shape == (2, num_patches, 32 * 32 * 3)
    assert mask.shape == (2, num_patches)
    assert torch.isfinite(loss)


def test_wrong_image_size_and_mask_shape_are_clear_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"100x64 is not divisible by the patch size 32"):
        model(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match=r"mask must have shape"):
        model(_images(n=2, h=64, w=64), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="same number of visible patches"):
        model(_images(n=2, h=64, w=64), torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="leaves no visible patch"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown encoder backend"):
        FCMAE("atto", backend="sparse")


def test_a_given_mask_is_used_as_is() -> None:
    model = _model()
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    _, _, used = model(_images(n=2, h=64, w=64), mask)
    assert torch.equal(used, mask)


def test_encoder_weights_give_the_dense_model_the_same_features() -> None:
    model = _model().eval()
    dense = build("atto", num_classes=0).eval()
    dense.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = _images()
    nothing_masked = torch.zeros(3, model.grid_size(imgs)[0] * model.grid_size(imgs)[1])
    with torch.no_grad():
        expected = dense.forward_features(imgs)
        for backend in ("dense_masked", "gather"):
            model.backend = backend
            assert rel_err(model.forward_encoder(imgs, nothing_masked), expected) < TOL, backend


def test_minkowski_backend_without_the_library_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    minkowski_available.cache_clear()
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # as on a machine without it (import fails)
    try:
        assert not minkowski_available()
        with pytest.raises(RuntimeError, match=r"needs MinkowskiEngine.*backend='gather'"):
            FCMAE("atto", backend="minkowski")
    finally:
        minkowski_available.cache_clear()  # the next test sees this machine as it is


def test_ablation_models_v1_blocks_and_dense_convolutions() -> None:
    imgs = _images(n=2, h=64, w=64)
    v1 = randomize_(FCMAE("atto", decoder_dim=64, block="v1"), seed=3)
    names = {n for n, _ in v1.encoder.named_parameters()}
    assert not any(".grn." in n for n in names) and "stages.0.blocks.0.layer_scale" in names
    mask = v1.random_mask(imgs, torch.Generator().manual_seed(1))
    with torch.no_grad():
        v1.backend = "dense_masked"
        reference = v1.forward_encoder(imgs, mask)
        v1.backend = "gather"
        assert rel_err(v1.forward_encoder(imgs, mask), reference) < TOL
    dense = _model()
    with torch.no_grad():
        sparse_features = dense.forward_encoder(imgs, mask)
        dense.sparse = False
        dense_features = dense.forward_encoder(imgs, mask)
    visible = 1 - mask.reshape(-1, 1, 2, 2)
    assert rel_err(dense_features * visible, sparse_features * visible) > 1e-2  # dense convs see the holes


def _grads(model: torch.nn.Module, imgs: torch.Tensor, mask: torch.Tensor | None, seed: int) -> torch.Tensor:
    """All gradients of one loss, flattened, with drop path drawn from ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(imgs, mask)[0] if mask is not None else model(imgs).square().mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("backend", ["gather", "dense_masked", "classifier"])
def test_activation_checkpointing_gives_identical_gradients(backend: str) -> None:
    """Per-stage checkpointing recomputes blocks in backward, drop path included: the gradients are bitwise the
    plain ones, and fewer bytes are kept for backward. Control: the same comparison must reject a run whose only
    difference is another drop-path draw."""
    imgs = _images(n=2, h=96, w=96)
    if backend == "classifier":
        model: torch.nn.Module = randomize_(build("atto", num_classes=10, drop_path=0.3), seed=7).train()
        encoder = model
        mask = None
    else:
        fcmae = _model(drop_path=0.3, backend=backend).train()
        model, encoder = fcmae, fcmae.encoder
        mask = fcmae.random_mask(imgs, torch.Generator().manual_seed(1))
    plain = _grads(model, imgs, mask, seed=3)
    saved_plain = _saved_bytes(model, imgs, mask)
    encoder.set_grad_checkpointing([False, True, True, True])  # type: ignore[operator]
    checkpointed = _grads(model, imgs, mask, seed=3)
    assert torch.equal(checkpointed, plain)
    assert _saved_bytes(model, imgs, mask) < 0.8 * saved_plain
    other_draw = _grads(model, imgs, mask, seed=4)
    assert not torch.equal(other_draw, plain)


def _saved_bytes(model: torch.nn.Module, imgs: torch.Tensor, mask: torch.Tensor | None) -> int:
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(imgs, mask) if mask is not None else model(imgs)
    return saved
