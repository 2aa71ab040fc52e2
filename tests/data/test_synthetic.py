"""The synthetic loader resumes on any world size and per-rank batch without repeating a sample."""

from __future__ import annotations

import pytest

from data.synthetic import SyntheticLoader

N = 96


def _loaders(world: int, batch: int) -> list[SyntheticLoader]:
    return [SyntheticLoader(N, batch_size=batch, image_size=32, rank=r, world_size=world) for r in range(world)]


def _take(loaders: list[SyntheticLoader], steps: int | None) -> list[int]:
    """Sample indices served by all ranks over ``steps`` steps (None: to the end of the epoch)."""
    seen: list[int] = []
    iters = [iter(loader) for loader in loaders]
    step = 0
    while steps is None or step < steps:
        try:
            for it in iters:
                seen += [int(k.rsplit("-", 1)[1]) for k in next(it).keys]
        except StopIteration:
            break
        step += 1
    return seen


def _ledger_problems(first: list[int], rest: list[int], new_global_batch: int) -> list[str]:
    """What is wrong with an epoch served as ``first`` then ``rest`` (empty list: nothing)."""
    problems = []
    seen = first + rest
    if len(set(seen)) != len(seen):
        problems.append(f"{len(seen) - len(set(seen))} samples served twice")
    skipped = sorted(set(range(min(seen), max(seen) + 1)) - set(seen))
    if len(skipped) > new_global_batch - 1:
        problems.append(f"{len(skipped)} samples skipped (bound {new_global_batch - 1})")
    return problems


@pytest.mark.parametrize(
    ("old", "new"),
    [((2, 4), (1, 8)), ((1, 8), (2, 4)), ((2, 4), (1, 6)), ((2, 3), (4, 5)), ((3, 2), (2, 3))],
)
def test_resume_on_another_layout_repeats_nothing_and_skips_less_than_a_global_batch(
    old: tuple[int, int], new: tuple[int, int]
) -> None:
    before = _loaders(*old)
    first = _take(before, steps=3)
    state = before[0].state_dict()
    after = _loaders(*new)
    for loader in after:
        loader.load_state_dict(state)
    rest = _take(after, steps=None)
    assert rest, "the resumed loader served nothing"
    assert _ledger_problems(first, rest, new[0] * new[1]) == []
    assert first == list(range(len(first)))  # the first segment is the start of the epoch

    # Negative control: the same resume one new step too early must be caught by the same check.
    resumed = _loaders(*new)[0]
    resumed.load_state_dict(state)
    one_step_early = {**resumed.state_dict(), "position": resumed.state_dict()["position"] - 1}
    early = _loaders(*new)
    for loader in early:
        loader.load_state_dict(one_step_early)
    assert any("twice" in p for p in _ledger_problems(first, _take(early, steps=None), new[0] * new[1]))


def test_same_layout_resume_continues_at_the_exact_sample() -> None:
    loaders = _loaders(2, 4)
    first = _take(loaders, steps=5)
    resumed = _loaders(2, 4)
    for loader in resumed:
        loader.load_state_dict(loaders[0].state_dict())
    assert first + _take(resumed, steps=None) == list(range(N))
