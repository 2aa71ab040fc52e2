"""``model.compile``: torch.compile (inductor) of FCMAE gives eager's loss and gradients, and compiles once.

The gather encoder's indices have sizes fixed by the visible count (no ``nonzero``), so every step of a run has
the same shapes and the compiled graph is reused: a recompile here would be one on every step of a real run.
Drop path is off: inductor draws its own random numbers, so compiled and eager runs drop different paths.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from models.fcmae import FCMAE
from tests.support.tensors import randomize_, rel_err


def _loss_and_grads(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor, visible: int) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _, _ = model(imgs, mask, visible=visible)
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gather", "dense_masked"])
def test_compiled_fcmae_matches_eager_and_never_recompiles(backend: str) -> None:
    torch._dynamo.reset()
    model = randomize_(FCMAE("atto", decoder_dim=64, backend=backend), seed=7)
    assert isinstance(model, FCMAE)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        imgs = torch.randn(4, 3, 96, 96, generator=gen)
        batches.append((imgs, model.random_mask(imgs, gen)))
    visible = model.visible_patches(3, 3)
    eager = [_loss_and_grads(model, imgs, mask, visible) for imgs, mask in batches]

    model.compile()
    first = _loss_and_grads(model, *batches[0], visible)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second compile of the model would raise
        compiled = [first] + [_loss_and_grads(model, imgs, mask, visible) for imgs, mask in batches[1:]]
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled, strict=True):
        assert loss_c == pytest.approx(loss_e, rel=1e-4)
        assert rel_err(grads_c, grads_e) < 1e-3
    # Control: the same tolerance tells two different batches apart.
    assert rel_err(compiled[1][1], eager[0][1]) > 1e-1
