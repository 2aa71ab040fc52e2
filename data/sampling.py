"""Epoch plans: which sample of the shard set fills which batch slot of which rank and dataloader worker.

Pure index arithmetic on the manifest's sample counts (numpy, no I/O), so every process computes the same plan.

* **Global order.** Epoch ``e`` concatenates the shards in an order shuffled from ``(seed, e)``; a sample's
  *position* is its index in that concatenation.
* **Pool.** The positions still to be served this epoch: all of them at the start; after a resume under another
  layout, those the earlier layouts did not consume (see :class:`Segment`). Held as position intervals less single
  positions (:class:`Pool`), never as an array over the epoch.
* **Ranks.** With ``B = floor(len(pool) / (world_size * batch_size))`` batches per rank (``remainder="drop"``),
  rank ``r`` takes the contiguous pool slice ``[r*B*bs, (r+1)*B*bs)``: every rank yields exactly ``B`` batches,
  whatever the shard sizes, and reads only about ``1/world_size`` of the bytes. The dropped tail (fewer than
  ``world_size * batch_size`` samples) is the end of the shuffled order, so it differs every epoch. With
  ``"wrap"`` (or ``"pad"``) ``B`` is rounded up and the slice wraps around to the pool start; ``"pad"`` marks the
  wrapped slots so their labels can be ignored (exact evaluation).
* **Canonical ranks.** The plan is cut for the layout's ranks, the *canonical* ones; a run's physical ranks read
  it through a :class:`RankView`: with ``W`` ranks dividing the ``C`` canonical ones, each physical rank serves
  ``C / W`` of them, taking from each, for optimizer step ``k``, the canonical batches it contributes to step ``k``.
  The samples of every step are therefore the same on any such world size (only the accumulation changes).
* **Workers.** Batch ``j`` of a (canonical) rank is made by logical worker ``j % W``; worker ``w`` owns a contiguous
  block of the rank's slice (its ``len(range(w, B, W))`` batches), so workers read disjoint byte ranges. Inside the
  block, windows of ``window`` samples (a multiple of the batch size) are permuted from ``(seed, e, segment, rank,
  w, k)``: a bounded shuffle that a resume can reproduce without reading anything.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Remainder = Literal["drop", "wrap", "pad"]
REMAINDER_MODES: tuple[str, ...] = ("drop", "wrap", "pad")

# Domain tags keep the streams of derived seeds independent of each other.
TAG_SHARD_ORDER = 1
TAG_WINDOW = 2
TAG_SAMPLE = 3
TAG_MIX = 4
TAG_SOURCE_ORDER = 5


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, platforms and Python versions (unlike ``hash``)."""
    packed = struct.pack(f"<{len(parts)}Q", *(p & 0xFFFF_FFFF_FFFF_FFFF for p in parts))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the augmentation draws of the batch slot holding global ``position`` in ``epoch``."""
    return derive_seed(seed, TAG_SAMPLE, epoch, position)


@dataclass(frozen=True)
class Layout:
    """Everything that shapes how a pool is cut into rank, worker and batch slots."""

    world_size: int
    """Number of data-parallel ranks."""
    num_workers: int
    """Sample streams per rank (dataloader workers; 1 when loading in the main process)."""
    batch_size: int
    """Samples per batch on each rank."""
    remainder: Remainder = "drop"
    """What happens to the samples that do not fill a whole batch on every rank: drop, wrap or pad."""
    window: int = 0
    """Shuffle window in samples (a multiple of ``batch_size``); 0 = no in-block shuffle."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.num_workers < 1 or self.batch_size < 1:
            raise ValueError(f"layout needs world_size, num_workers, batch_size >= 1, got {self}")
        if self.remainder not in REMAINDER_MODES:
            raise ValueError(f"remainder {self.remainder!r}: choose one of {REMAINDER_MODES}")
        if self.window < 0 or self.window % self.batch_size:
            raise ValueError(f"window {self.window} must be a non-negative multiple of batch_size {self.batch_size}")

    def batches(self, pool_size: int) -> int:
        """Batches per rank for a pool of ``pool_size`` samples."""
        per_step = self.world_size * self.batch_size
        return pool_size // per_step if self.remainder == "drop" else -(-pool_size // per_step)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Layout:
        """Inverse of :meth:`to_dict`."""
        return cls(
            world_size=int(raw["world_size"]),
            num_workers=int(raw["num_workers"]),
            batch_size=int(raw["batch_size"]),
            remainder=raw["remainder"],
            window=int(raw["window"]),
        )


@dataclass(frozen=True)
class Segment:
    """Part of an epoch served under one layout: ``consumed`` batches per rank (ranks move in lockstep)."""

    layout: Layout
    """The layout of this part."""
    consumed: int
    """Batches each rank consumed under it."""


@dataclass(frozen=True)
class RankView:
    """How ``world_size`` physical ranks serve a canonical :class:`Layout`: physical rank ``r`` serves the
    ``ranks_per = C / world_size`` canonical ranks ``r * ranks_per ...``; an optimizer step takes ``canonical_accum``
    consecutive canonical batches from each of them, each cut into ``splits`` micro-batches of ``batch_size``.
    A rank's micro-batch ``i`` is (step, canonical rank, canonical batch, piece) in that nesting, so step ``k``
    trains on the same samples on every view of the layout. Only whole steps are served: the canonical batches
    that do not fill a step at the end of an epoch are left out (the trainer drops a partial step anyway)."""

    layout: Layout
    """The canonical layout (its ``world_size`` is the canonical rank count)."""
    world_size: int
    """Physical data-parallel ranks."""
    batch_size: int
    """Physical micro-batch."""
    accum: int
    """Physical micro-batches per optimizer step."""

    def __post_init__(self) -> None:
        if not self.fits(self.layout, self.world_size, self.batch_size, self.accum):
            raise ValueError(
                f"{self.world_size} ranks x {self.accum} micro-batches of {self.batch_size} cannot read a layout of "
                f"{self.layout.world_size} ranks x batches of {self.layout.batch_size}: the ranks must divide, the "
                "micro-batch divide the batch, and a step hold a whole number of canonical batches per canonical rank"
            )

    @staticmethod
    def fits(layout: Layout, world_size: int, batch_size: int, accum: int) -> bool:
        """Whether ``world_size`` ranks x ``accum`` micro-batches of ``batch_size`` can serve ``layout``."""
        if world_size < 1 or batch_size < 1 or accum < 1:
            return False
        if layout.world_size % world_size or layout.batch_size % batch_size:
            return False
        per_step = (layout.world_size // world_size) * (layout.batch_size // batch_size)
        return accum % per_step == 0

    @classmethod
    def identity(cls, layout: Layout, accum: int = 1) -> RankView:
        """Every canonical rank a physical one, with ``accum`` of its batches a step."""
        return cls(layout, layout.world_size, layout.batch_size, accum)

    @property
    def ranks_per(self) -> int:
        """Canonical ranks each physical rank serves."""
        return self.layout.world_size // self.world_size

    @property
    def splits(self) -> int:
        """Micro-batches per canonical batch."""
        return self.layout.batch_size // self.batch_size

    @property
    def canonical_accum(self) -> int:
        """Canonical batches each canonical rank contributes to a step."""
        return self.accum // (self.ranks_per * self.splits)

    def batches(self, pool_size: int) -> int:
        """Micro-batches per physical rank for a pool of ``pool_size`` samples (whole steps)."""
        return self.layout.batches(pool_size) // self.canonical_accum * self.accum

    def locate(self, rank: int, micro: int) -> tuple[int, int, int]:
        """(canonical rank, canonical batch, piece) of physical ``rank``'s micro-batch ``micro``."""
        step, within = divmod(micro, self.accum)
        offset, rest = divmod(within, self.canonical_accum * self.splits)
        batch, piece = divmod(rest, self.splits)
        return rank * self.ranks_per + offset, step * self.canonical_accum + batch, piece

    def consumed(self, micro: int) -> int:
        """Canonical batches every canonical rank consumed when each physical rank consumed ``micro`` micro-batches
        (whole steps: a partly served step is served again)."""
        return micro // self.accum * self.canonical_accum

    def to_dict(self) -> dict[str, int]:
        """Plain dict for checkpoints (the layout is stored beside it)."""
        return {"world_size": self.world_size, "batch_size": self.batch_size, "accum": self.accum}

    @classmethod
    def from_dict(cls, layout: Layout, raw: Mapping[str, Any]) -> RankView:
        """Inverse of :meth:`to_dict`."""
        return cls(layout, int(raw["world_size"]), int(raw["batch_size"]), int(raw["accum"]))


def worker_batches(num_batches: int, num_workers: int, worker: int) -> int:
    """How many of the rank batches ``0 .. num_batches-1`` logical ``worker`` makes (batch ``j`` -> ``j % W``)."""
    return len(range(worker, num_batches, num_workers))


class EpochOrder:
    """The global sample order of one epoch: shuffled shard order, and position -> (shard, member) lookup."""

    def __init__(self, shard_sizes: Sequence[int], seed: int, epoch: int, shuffle: bool) -> None:
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        if shuffle:
            rng = np.random.default_rng(derive_seed(seed, TAG_SHARD_ORDER, epoch))
            self.shard_order = rng.permutation(len(sizes))
        else:
            self.shard_order = np.arange(len(sizes))
        self.ends = np.cumsum(sizes[self.shard_order])
        self.starts = self.ends - sizes[self.shard_order]
        self.total = int(self.ends[-1]) if len(sizes) else 0

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard indices (into the manifest list) and member indices of global ``positions``."""
        k = np.searchsorted(self.ends, positions, side="right")
        return self.shard_order[k], positions - self.starts[k]


def mixture_counts(total: int, weights: Sequence[float]) -> np.ndarray:
    """Positions of each source in an epoch of ``total``: shares proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum() * total
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: total - int(counts.sum())]] += 1
    return counts


LOCATE_GAP = 4096
"""Positions further apart than this are located in separate merges (:meth:`MixtureOrder.locate`)."""


class MixtureOrder:
    """The global sample order of one epoch of a weighted mixture of sources (same interface as :class:`EpochOrder`).

    * **Length.** An epoch has as many positions as the sources have samples together; source ``s`` fills
      ``n_s`` of them, its weight's share (largest remainder), whatever its size.
    * **Interleaving.** Source ``s``'s positions are spread evenly over the epoch (stratified: its ``q``-th one sits
      at ``(q + u_s) / n_s`` of the way, ``u_s`` drawn from ``(seed, epoch)``; ties go to the lower source), so every
      batch holds the sources in about their proportions and every rank's contiguous slice does too.
    * **Streams.** Each source is read as an endless stream of passes; pass ``j`` is the source's shards in an
      order shuffled from ``(seed, s, j)``. Epoch ``e`` takes the stream's samples ``e*n_s .. (e+1)*n_s - 1``: an
      up-weighted source repeats a sample only after serving all of them, a down-weighted one continues in the next
      epoch where this one stopped. Consecutive positions of a source are consecutive in its stream, so a worker
      reads each source's shards forward.

    Nothing is held per position: the entries of a range of positions are merged from the sources' keys in that
    range (the keys below a value are counted per source), so locating costs what the range holds plus the number
    of sources, at any size of the set.
    """

    def __init__(
        self,
        shard_sizes: Sequence[int],
        shard_sources: Sequence[int],
        weights: Sequence[float],
        seed: int,
        epoch: int,
        shuffle: bool,
    ) -> None:
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        owner = np.asarray(shard_sources, dtype=np.int64)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.shards_of = [np.flatnonzero(owner == s) for s in range(len(weights))]
        self.source_sizes = np.array([int(sizes[idx].sum()) for idx in self.shards_of], dtype=np.int64)
        if (self.source_sizes == 0).any():
            raise ValueError(f"mixture source {int(np.argmin(self.source_sizes))} holds no samples")
        self.total = int(sizes.sum())
        self.counts = mixture_counts(self.total, weights)
        """``n_s``: the positions of each source in the epoch."""
        rng = np.random.default_rng(derive_seed(seed, TAG_MIX, epoch)) if shuffle else None
        self.offsets = np.array([rng.random() if rng is not None else 0.5 for _ in range(len(weights))])
        """``u_s``: where in its first stratum each source's positions start."""
        self._sizes = sizes
        self._passes: dict[tuple[int, int], EpochOrder] = {}

    def _pass(self, source: int, number: int) -> EpochOrder:
        key = (source, number)
        if key not in self._passes:
            sizes = self._sizes[self.shards_of[source]]
            seed = derive_seed(self.seed, TAG_SOURCE_ORDER, source)
            self._passes[key] = EpochOrder(sizes.tolist(), seed, number, self.shuffle)
        return self._passes[key]

    def _below(self, source: int, x: float, inclusive: bool) -> int:
        """How many of ``source``'s keys are below ``x`` (at most ``x`` when ``inclusive``): from the arithmetic
        estimate, corrected on the keys as floats compute them."""
        n, u = int(self.counts[source]), float(self.offsets[source])

        def under(q: int) -> bool:
            key = (q + u) / n
            return key <= x if inclusive else key < x

        count = min(max(int(np.floor(x * n - u)) + 1, 0), n)
        while count > 0 and not under(count - 1):
            count -= 1
        while count < n and under(count):
            count += 1
        return count

    def entries(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of each position ``lo .. hi-1`` and its index among that source's positions of the epoch.

        Every key in ``[x_lo, x_hi]`` is merged (stable: by key, then source, then index); the keys below ``x_lo``
        are counted, which places the merged run in the epoch. Per source ``ceil(x n_s - u_s)`` keys lie below
        ``x``, so with a margin of (number of sources + 2) positions on each side the run covers ``lo .. hi-1``."""
        sources = [s for s in range(len(self.counts)) if self.counts[s] > 0]
        margin = len(self.counts) + 2
        x_lo, x_hi = max(0.0, (lo - margin) / self.total), (hi + margin) / self.total
        first = [self._below(s, x_lo, inclusive=False) for s in sources]
        last = [self._below(s, x_hi, inclusive=True) for s in sources]
        index = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(first, last, strict=True)])
        source = np.repeat(np.asarray(sources, dtype=np.int64), np.subtract(last, first))
        keys = (index + self.offsets[source]) / self.counts[source]
        start = sum(first)
        assert start <= lo and start + len(keys) >= hi, (lo, hi, start, len(keys))
        merged = np.argsort(keys, kind="stable")[lo - start : hi - start]
        return source[merged], index[merged]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard indices (into the manifest list) and member indices of global ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        sources = np.empty(len(positions), dtype=np.int64)
        index = np.empty(len(positions), dtype=np.int64)
        by_position = np.argsort(positions, kind="stable")
        ordered = positions[by_position]
        # Runs of nearby positions are merged together; far apart ones separately (memory follows the positions).
        for run in np.split(by_position, np.flatnonzero(np.diff(ordered) > LOCATE_GAP) + 1):
            if len(run) == 0:
                continue
            at = positions[run]  # ascending: ``run`` follows the sorted order
            lo, hi = int(at[0]), int(at[-1]) + 1
            run_sources, run_index = self.entries(lo, hi)
            sources[run], index[run] = run_sources[at - lo], run_index[at - lo]
        shards = np.empty(len(positions), dtype=np.int64)
        members = np.empty(len(positions), dtype=np.int64)
        for s in np.unique(sources).tolist():
            at = np.flatnonzero(sources == s)
            stream = self.epoch * int(self.counts[s]) + index[at]
            passes, within = np.divmod(stream, self.source_sizes[s])
            for number in np.unique(passes).tolist():
                sel = at[passes == number]
                local, member = self._pass(s, number).locate(within[passes == number])
                shards[sel], members[sel] = self.shards_of[s][local], member
        return shards, members


@dataclass(frozen=True)
class WorkerShare:
    """The slots of one logical worker of one rank, in the order it emits them (``num_batches * bs`` slots)."""

    positions: np.ndarray
    """Global positions of the samples filling the slots."""
    padded: np.ndarray
    """True for slots filled by wrapping under ``remainder="pad"`` (their labels are ignored)."""
    num_batches: int
    """Batches this worker makes."""
    batch_size: int
    """Slots per batch."""
    window: int
    """Shuffle window of the share (0: no shuffle)."""

    def batch(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions and padding flags of the worker's local batch ``t``."""
        s = slice(t * self.batch_size, (t + 1) * self.batch_size)
        return self.positions[s], self.padded[s]


def _block(layout: Layout, pool_size: int, rank: int, worker: int) -> tuple[int, int]:
    """(first pool index, batches) of logical ``worker``'s contiguous block on ``rank``."""
    num_batches = layout.batches(pool_size)
    counts = [worker_batches(num_batches, layout.num_workers, w) for w in range(layout.num_workers)]
    return (rank * num_batches + sum(counts[:worker])) * layout.batch_size, counts[worker]


def _window_order(length: int, *, seed: int, epoch: int, segment: int, rank: int, worker: int, k: int) -> np.ndarray:
    """The permutation of window ``k`` (``length`` slots) of a worker's block."""
    rng = np.random.default_rng(derive_seed(seed, TAG_WINDOW, epoch, segment, rank, worker, k))
    return rng.permutation(length)


def worker_share(
    pool: Pool, layout: Layout, rank: int, worker: int, *, seed: int, epoch: int, segment: int
) -> WorkerShare:
    """Cut ``pool`` by ``layout`` and return the share of logical ``worker`` on ``rank``."""
    n, bs = len(pool), layout.batch_size
    first, count = _block(layout, n, rank, worker)
    idx = np.arange(first, first + count * bs, dtype=np.int64)
    padded = idx >= n if layout.remainder == "pad" else np.zeros(len(idx), dtype=bool)
    positions = pool.take(idx % n) if n else idx
    window = layout.window
    if window and len(idx):
        perm = np.empty(len(idx), dtype=np.int64)
        for k, lo in enumerate(range(0, len(idx), window)):
            hi = min(lo + window, len(idx))
            perm[lo:hi] = lo + _window_order(hi - lo, seed=seed, epoch=epoch, segment=segment, rank=rank,
                                             worker=worker, k=k)  # fmt: skip
        positions, padded = positions[perm], padded[perm]
    return WorkerShare(positions, padded, count, bs, window)


class Pool:
    """The positions of an epoch still to be served, ascending: disjoint intervals ``[start, start + length)`` less
    single positions (``holes``).

    Its size in memory follows the cuts that earlier layouts' consumption made (an interval boundary per rank and
    worker, a hole per sample taken from a partly served shuffle window), not the size of the epoch: an epoch of two
    billion samples is one interval until a layout change cuts it."""

    def __init__(self, starts: np.ndarray, lengths: np.ndarray, holes: np.ndarray | None = None) -> None:
        keep = lengths > 0
        self.starts = np.ascontiguousarray(starts[keep], dtype=np.int64)
        self.lengths = np.ascontiguousarray(lengths[keep], dtype=np.int64)
        self.ends = np.cumsum(self.lengths)
        """Index (among the intervals' positions, holes included) just past each interval."""
        self.holes = np.zeros(0, dtype=np.int64) if holes is None else np.asarray(holes, dtype=np.int64)
        """Positions inside the intervals that are not in the pool, ascending."""
        k = np.searchsorted(self.starts, self.holes, side="right") - 1
        at = self.ends[k] - self.lengths[k] + self.holes - self.starts[k]  # the holes' indices among the intervals'
        self._skip = at - np.arange(len(at), dtype=np.int64)  # pool index i sits at i + #(skip <= i)

    @classmethod
    def full(cls, total: int) -> Pool:
        """Every position of an epoch of ``total`` samples."""
        return cls(np.array([0], dtype=np.int64), np.array([total], dtype=np.int64))

    def __len__(self) -> int:
        return (int(self.ends[-1]) if len(self.ends) else 0) - len(self.holes)

    def _interval_positions(self, at: np.ndarray) -> np.ndarray:
        k = np.searchsorted(self.ends, at, side="right")
        return self.starts[k] + at - (self.ends[k] - self.lengths[k])

    def take(self, index: np.ndarray) -> np.ndarray:
        """Positions at pool indices ``index`` (each in ``[0, len)``)."""
        index = np.asarray(index, dtype=np.int64)
        return self._interval_positions(index + np.searchsorted(self._skip, index, side="right"))

    def without(self, starts: np.ndarray, stops: np.ndarray, points: np.ndarray) -> Pool:
        """This pool less the entries at pool indices ``[starts[i], stops[i])`` and ``points``."""
        keep = stops > starts
        # A run of pool indices is every pool position from its first to its last: cut that span of positions.
        lo, hi = self.take(starts[keep]), self.take(stops[keep] - 1) + 1
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], hi[order]
        if len(lo):  # merge overlapping spans
            reach = np.maximum.accumulate(hi)
            opens = np.concatenate([[True], lo[1:] > reach[:-1]])
            closes = np.concatenate([opens[1:], [True]])
            lo, hi = lo[opens], reach[closes]
        gaps_lo = np.concatenate([[np.iinfo(np.int64).min], hi])
        gaps_hi = np.concatenate([lo, [np.iinfo(np.int64).max]])
        new_starts, new_lengths = _intersect(self.starts, self.starts + self.lengths, gaps_lo, gaps_hi)
        holes = np.concatenate([self.holes, self.take(points)])
        holes.sort()
        holes = holes[np.concatenate([[True], holes[1:] != holes[:-1]])] if len(holes) else holes
        k = np.searchsorted(new_starts, holes, side="right") - 1  # holes in a cut span are gone with it
        inside = (k >= 0) & (holes < (new_starts + new_lengths)[np.maximum(k, 0)]) if len(new_starts) else k < -1
        return Pool(new_starts, new_lengths, holes[inside])


def _intersect(a_lo: np.ndarray, a_hi: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The intersection of two lists of sorted disjoint intervals, as (starts, lengths)."""
    cuts = np.sort(np.concatenate([a_lo, a_hi, b_lo, b_hi]))
    cuts = cuts[np.concatenate([[True], cuts[1:] != cuts[:-1]])]
    lo, hi = cuts[:-1], cuts[1:]

    def inside(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        k = np.searchsorted(starts, lo, side="right") - 1
        return (k >= 0) & (lo < stops[np.maximum(k, 0)])

    kept = inside(a_lo, a_hi) & inside(b_lo, b_hi)
    lo, length = lo[kept], (hi - lo)[kept]
    joins = np.concatenate([[False], lo[1:] == lo[:-1] + length[:-1]]) if len(lo) else np.zeros(0, dtype=bool)
    group = np.cumsum(~joins) - 1
    return lo[~joins], np.bincount(group, weights=length, minlength=int(group[-1]) + 1 if len(group) else 0).astype(
        np.int64
    )


def remaining_pool(total: int, history: Sequence[Segment], *, seed: int, epoch: int) -> Pool:
    """Positions of ``epoch`` not consumed by the segments of ``history`` (in global order).

    Every slot consumed in an earlier segment is removed, so a layout change never repeats a sample; samples that
    the earlier layouts had not reached, including their dropped remainders, stay in the pool. Computed per rank and
    worker block without listing the epoch: a block's whole consumed windows are one run of pool indices, and only
    its partly consumed window is permuted.
    """
    pool = Pool.full(total)
    for index, seg in enumerate(history):
        lay, n = seg.layout, len(pool)
        if not 0 <= seg.consumed <= lay.batches(n):
            raise ValueError(
                f"loader state: segment {index} consumed {seg.consumed} batches but its layout has only "
                f"{lay.batches(n)}; the state does not belong to this data set"
            )
        runs: list[tuple[int, int]] = []
        points: list[np.ndarray] = []
        for rank in range(lay.world_size):
            for w in range(lay.num_workers):
                used = worker_batches(seg.consumed, lay.num_workers, w) * lay.batch_size
                if not used:
                    continue
                first, count = _block(lay, n, rank, w)
                whole = used // lay.window * lay.window if lay.window else used  # whole windows: one run
                runs.append((first, first + whole))
                if used > whole:  # the partly consumed window: its first `used - whole` permuted slots
                    length = min(lay.window, count * lay.batch_size - whole)
                    order = _window_order(length, seed=seed, epoch=epoch, segment=index, rank=rank, worker=w,
                                          k=whole // lay.window)  # fmt: skip
                    points.append(first + whole + order[: used - whole])
        lo, hi = np.array(runs, dtype=np.int64).T if runs else np.zeros((2, 0), dtype=np.int64)
        lo, hi = _in_pool(lo, hi, n, lay.remainder)
        spots = np.concatenate(points) if points else np.zeros(0, dtype=np.int64)
        spots = spots[spots < n] if lay.remainder == "pad" else spots % max(n, 1)
        pool = pool.without(lo, hi, spots)
    return pool


def _in_pool(starts: np.ndarray, stops: np.ndarray, n: int, remainder: Remainder) -> tuple[np.ndarray, np.ndarray]:
    """Slot intervals as pool-index intervals: slots past the pool's end are padding (``"pad"``: nothing served) or
    wrap to its start (``"wrap"``, ``"drop"`` never gets there)."""
    nonempty = stops > starts
    starts, stops = starts[nonempty], stops[nonempty]
    if remainder == "pad" or not n:
        return np.minimum(starts, n), np.minimum(stops, n)
    laps = (stops - 1) // n  # an interval lies in lap starts // n .. (stops - 1) // n
    first_lap = starts // n
    out_lo, out_hi = [starts - first_lap * n], [np.where(laps == first_lap, stops - first_lap * n, n)]
    wrapped = laps > first_lap
    if wrapped.any():  # a slot range that runs past the end covers the pool's start again
        out_lo.append(np.zeros(int(wrapped.sum()), dtype=np.int64))
        out_hi.append(np.where(laps[wrapped] - first_lap[wrapped] > 1, n, stops[wrapped] - laps[wrapped] * n))
    return np.concatenate(out_lo), np.concatenate(out_hi)


@dataclass(frozen=True)
class RankPlan:
    """What one rank serves for the rest of an epoch: the pool, the canonical layout and this rank's view of it,
    and where it stands."""

    pool: Pool
    """Positions served by the current segment (all ranks)."""
    view: RankView
    """The current canonical layout and how the physical ranks read it."""
    segment: int
    """Index of the current segment (number of earlier layouts this epoch)."""
    position: int
    """Micro-batches this rank already consumed in the current segment."""

    @property
    def layout(self) -> Layout:
        """The current segment's canonical layout."""
        return self.view.layout

    @property
    def num_batches(self) -> int:
        """Micro-batches per rank in the current segment."""
        return self.view.batches(len(self.pool))

    @property
    def remaining(self) -> int:
        """Micro-batches still to come in this epoch."""
        return max(0, self.num_batches - self.position)
