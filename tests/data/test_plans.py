"""Epoch plans without listing the epoch: the interval pool gives the slots of the explicit plan, and planning a
rank's share costs memory in what the rank reads, not in the size of the set."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np

from data.sampling import EpochOrder, Layout, Pool, Segment, remaining_pool, worker_batches, worker_share


def _explicit_pool(total: int, history: list[Segment], seed: int, epoch: int) -> np.ndarray:
    """The remaining pool computed the direct way: every slot of every earlier share listed and crossed out."""
    pool = np.arange(total, dtype=np.int64)
    for index, seg in enumerate(history):
        lay = seg.layout
        consumed = np.zeros(total, dtype=bool)
        as_pool = Pool(pool, np.ones(len(pool), dtype=np.int64))
        for rank in range(lay.world_size):
            for w in range(lay.num_workers):
                share = worker_share(as_pool, lay, rank, w, seed=seed, epoch=epoch, segment=index)
                used = worker_batches(seg.consumed, lay.num_workers, w) * lay.batch_size
                consumed[share.positions[:used][~share.padded[:used]]] = True
        pool = pool[~consumed[pool]]
    return pool


def test_the_interval_pool_is_the_explicit_pool_after_any_layout_changes() -> None:
    rng = random.Random(0)
    checked = 0
    for trial in range(300):
        total = rng.randint(1, 400)
        history: list[Segment] = []
        pool_size = total
        for _ in range(rng.randint(1, 3)):
            bs = rng.randint(1, 6)
            layout = Layout(rng.randint(1, 5), rng.randint(1, 3), bs, rng.choice(["drop", "wrap", "pad"]),
                            bs * rng.randint(0, 4))  # fmt: skip
            batches = layout.batches(pool_size)
            if not batches:
                break
            history.append(Segment(layout, rng.randint(0, batches)))
            pool_size = len(_explicit_pool(total, history, seed=trial, epoch=1))
        expected = _explicit_pool(total, history, seed=trial, epoch=1)
        got = remaining_pool(total, history, seed=trial, epoch=1)
        assert len(got) == len(expected), (trial, history)
        assert np.array_equal(got.take(np.arange(len(got))), expected), (trial, history)
        checked += bool(history) and len(expected) < total
    assert checked > 100  # most trials consumed something


def _plan_share(total_shards: int, per_shard: int, world: int, rank: int, history: list[Segment]) -> int:
    """Plan ``rank``'s shares of an epoch (8 workers) as a loader's workers do; returns the slots planned."""
    order = EpochOrder([per_shard] * total_shards, seed=1, epoch=0, shuffle=True)
    pool = remaining_pool(order.total, history, seed=1, epoch=0)
    layout = Layout(world, 8, 32, "drop", 1024)
    slots = 0
    for w in range(8):
        share = worker_share(pool, layout, rank, w, seed=1, epoch=0, segment=len(history))
        shards, _ = order.locate(share.positions)
        slots += len(shards)
    return slots


def test_planning_memory_grows_with_what_a_rank_reads_not_with_the_set() -> None:
    """1/100 of the web-scale bench: 2,000 shards of 10,000 samples (20M), 1024 ranks, a resume onto 960 ranks
    mid-epoch. Planning rank 1023's share must stay within a small multiple of the bytes of its own slots; an
    explicit pool (8 bytes per sample of the set) alone would be 160 MB, and the same planning on a set 4x as large
    must not cost 4x."""

    def peak(shards: int) -> tuple[int, int]:
        resume = [Segment(Layout(1024, 8, 32, "drop", 1024), consumed=3)]
        tracemalloc.start()
        slots = _plan_share(shards, 10_000, 960, 959, resume)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, slots

    small, slots_small = peak(2_000)
    large, slots_large = peak(8_000)
    read_bytes = slots_small * 8  # the positions of the rank's own slots
    assert small < 40 * read_bytes + 32 * 2**20, (small, read_bytes)
    assert small < 20_000_000 * 8 / 4  # far below one int64 per sample of the set
    # 4x the set (and about 4x what the rank reads): the peak grows with the rank's share, not faster.
    assert 3.9 < slots_large / slots_small < 4.1
    assert large / small < 1.5 * slots_large / slots_small, (large, small)
