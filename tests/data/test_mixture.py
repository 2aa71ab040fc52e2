"""Weighted mixtures of shard sets: every epoch holds each source at its weight's share, interleaved evenly; a
source's samples repeat only after all were served; the order is fixed by the run seed and resumes exactly."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import LoaderConfig, ShardLoader, build_loader
from data.manifest import resolve_shards
from data.sampling import MixtureOrder
from data.transforms import pretrain_transform
from tests.support.shards import make_image_folder, write_folder_shards

Slot = tuple[int, str]  # (source, key)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    """20 samples in shards of 6: the small (domain) source."""
    root = tmp_path_factory.mktemp("small")
    folder = make_image_folder(root / "folder", classes=2, per_class=10, size=(9, 11))
    write_folder_shards(folder, str(root / "domain"), samples_per_shard=6)
    return str(root / "domain")


def _loader(mixture: dict[str, float], rank: int = 0, world: int = 2, seed: int = 4) -> ShardLoader:
    return build_loader(
        mixture,
        LoaderConfig(batch_size=4, rank=rank, world_size=world, num_workers=2, seed=seed, shuffle_window=8),
        transform=pretrain_transform(8),
    )


def _epochs(loader: ShardLoader, epochs: range, stop_after: int | None = None) -> list[tuple[list[Slot], torch.Tensor]]:
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append((list(zip(batch.sources, batch.keys, strict=True)), batch.images))
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


def _slots(batches: list[tuple[list[Slot], torch.Tensor]]) -> list[Slot]:
    return [slot for slots, _ in batches for slot in slots]


def test_each_epoch_holds_every_source_at_its_weight_and_repeats_only_after_a_full_pass(
    shard_dir: str, small_set: str
) -> None:
    """60 general + 20 domain samples at weights 1:3: an epoch of 80 serves 20 general and 60 domain samples. The
    domain source goes round 3 times (each key exactly 3 times), the general one continues where it stopped, so 3
    epochs serve each general key exactly once; every batch holds 3 domain samples of 4, give or take one."""
    mixture = {shard_dir: 1.0, small_set: 3.0}
    assert resolve_shards(mixture).source_sizes() == [60, 20]
    served: list[list[Slot]] = []
    for epoch in range(3):
        slots, batch_shares = [], []
        for rank in range(2):
            loader = _loader(mixture, rank)
            loader.set_epoch(epoch)
            batches = _epochs(loader, range(epoch, epoch + 1))
            assert len(batches) == 80 // (2 * 4)
            slots += _slots(batches)
            batch_shares += [sum(source for source, _ in b) for b, _ in batches]
            assert loader.source_samples == [sum(1 for s, _ in _slots(batches) if s == i) for i in (0, 1)]
        counts = Counter(source for source, _ in slots)
        assert counts == {0: 20, 1: 60}
        assert set(Counter(key for source, key in slots if source == 1).values()) == {3}  # 3 full passes
        assert all(2 <= share <= 4 for share in batch_shares), batch_shares
        served.append(slots)
    general = [key for slots in served for source, key in slots if source == 0]
    assert len(general) == 60 and len(set(general)) == 60  # over 3 epochs: the whole general set, once
    # Natural proportions (a list: one set, their union) would serve 60 general and 20 domain samples instead.
    union = [_loader([shard_dir, small_set], rank) for rank in range(2)]  # type: ignore[arg-type]
    assert union[0].shards.mixture is None and union[0].num_samples == 80


def test_the_mixture_is_fixed_by_the_seed_and_resumes_exactly(shard_dir: str, small_set: str) -> None:
    mixture = {shard_dir: 2.0, small_set: 1.0}
    epochs = range(2)
    reference = _epochs(_loader(mixture), epochs)
    again = _epochs(_loader(mixture), epochs)
    assert _slots(again) == _slots(reference)
    assert _slots(_epochs(_loader(mixture, seed=5), epochs)) != _slots(reference)  # the seed decides the order

    stop = random.Random(7).randrange(1, len(reference) - 1)
    first = _loader(mixture)
    head = _epochs(first, epochs, stop_after=stop)
    state = first.state_dict()
    resumed = _loader(mixture)
    resumed.load_state_dict(state)
    tail = _epochs(resumed, range(state["epoch"], 2))
    assert _slots(head + tail) == _slots(reference)
    for (_, ref_images), (_, images) in zip(reference, head + tail, strict=True):
        assert torch.equal(images, ref_images)  # the same crops after the restart
    uninterrupted = _loader(mixture)
    _epochs(uninterrupted, epochs)
    assert resumed.source_samples == uninterrupted.source_samples  # the counts resume with the position
    # A state saved under other weights would plan other epochs: refused, naming the setting.
    with pytest.raises(ValueError, match="mixture"):
        _loader({shard_dir: 1.0, small_set: 1.0}).load_state_dict(state)


def test_a_mixture_source_with_a_bad_weight_or_shared_shards_is_refused(shard_dir: str, small_set: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        resolve_shards({shard_dir: 1.0, small_set: 0.0})
    with pytest.raises(ValueError, match="share a shard"):
        resolve_shards({shard_dir: 1.0, str(Path(shard_dir) / "shard-000000.tar"): 1.0})


def _explicit_sources(order: MixtureOrder) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's order written out: every source's keys ``(q + u_s) / n_s`` sorted together (stable, so ties go
    to the lower source): source and per-source index of every position. One array over the epoch: the oracle."""
    keys = [(np.arange(n) + u) / n for n, u in zip(order.counts.tolist(), order.offsets.tolist(), strict=True)]
    merged = np.argsort(np.concatenate(keys), kind="stable")
    source = np.repeat(np.arange(len(order.counts)), order.counts)[merged]
    index = np.concatenate([np.arange(n) for n in order.counts.tolist()])[merged]
    return source, index


def test_the_mixture_order_is_the_explicit_merge_of_the_sources_at_any_size() -> None:
    """200 random mixtures (1-6 sources, sizes from 1 to 50,000, equal counts that tie without shuffling): the
    position -> source lookup, computed per range without an array over the epoch, is the explicit merge at every
    position, for whole epochs, random ranges and scattered positions. Control: the same comparison rejects the
    order of another epoch."""
    rng = random.Random(0)
    for case in range(200):
        sources = rng.randint(1, 6)
        sizes = [rng.choice([1, 7, 100, rng.randint(1, 50_000)]) for _ in range(sources)]
        weights = [rng.choice([1.0, 1.0, rng.uniform(0.01, 5.0)]) for _ in range(sources)]
        order = MixtureOrder(sizes, list(range(sources)), weights, seed=case, epoch=case % 3, shuffle=case % 4 != 0)
        source, index = _explicit_sources(order)
        lo = rng.randrange(order.total)
        hi = rng.randint(lo + 1, order.total)
        for (got_source, got_index), (a, b) in (
            (order.entries(lo, hi), (lo, hi)),
            (order.entries(0, order.total), (0, None)),
        ):
            assert np.array_equal(got_source, source[a:b]) and np.array_equal(got_index, index[a:b])
        scattered = np.array([rng.randrange(order.total) for _ in range(50)])
        shard, _ = order.locate(scattered)
        assert np.array_equal(shard, source[scattered])  # one shard per source here
    # Control: the comparison tells two epochs of the same mixture apart.
    mixture = ([400, 300, 300], [0, 1, 2], [0.5, 0.3, 0.2])
    source, _ = _explicit_sources(MixtureOrder(*mixture, seed=1, epoch=1, shuffle=True))
    assert not np.array_equal(MixtureOrder(*mixture, seed=1, epoch=2, shuffle=True).entries(0, 1000)[0], source)
    assert np.array_equal(MixtureOrder(*mixture, seed=1, epoch=1, shuffle=True).entries(0, 1000)[0], source)


def test_locating_a_ranks_share_of_a_large_mixture_costs_its_share_not_the_set() -> None:
    """20 million samples in three weighted sources (2,000 shards): locating the last 1/1024 of the epoch (a rank's
    slice) peaks at a small multiple of that slice's own arrays, where one int64 per position of the epoch (what an
    explicit order holds, twice) is 160 MB."""
    sizes = [10_000] * 2_000
    owner = [i % 3 for i in range(2_000)]
    order = MixtureOrder(sizes, owner, [0.5, 0.3, 0.2], seed=1, epoch=2, shuffle=True)
    share = order.total // 1024
    positions = np.arange(order.total - share, order.total)
    np.random.default_rng(0).shuffle(positions)  # a worker's windows arrive permuted
    tracemalloc.start()
    shards, _ = order.locate(positions)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * positions.nbytes, (peak, positions.nbytes)
    assert np.bincount(np.asarray(owner)[shards], minlength=3).tolist() == pytest.approx(
        [0.5 * share, 0.3 * share, 0.2 * share], abs=3
    )
