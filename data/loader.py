"""Streaming, resumable, rank-balanced loading of WebDataset shards from any fsspec URL.

Design (details of the slot assignment in :mod:`data.sampling`):

* The manifest gives each shard's sample count, so an epoch is planned without listing or reading tars: shards
  are shuffled from ``(seed, epoch)``, every rank gets a contiguous slice of exactly ``B`` batches
  (``B = floor(samples / (world_size * batch_size))`` with ``remainder="drop"``), split into per-worker blocks, and
  shuffled within windows of ``shuffle_window`` samples. Every rank therefore yields the same number of batches,
  also with uneven shards or fewer shards than ranks x workers.
* Each dataloader worker builds whole batches; batch ``j`` of a rank comes from worker ``j % W``, which is the order
  in which ``torch.utils.data.DataLoader`` collects from workers, so the batch sequence is deterministic (the
  loader checks it).
* Augmentation draws are seeded per batch slot from ``(seed, epoch, sample position)``
  (:func:`data.transforms.seeded_rng`), so they are the same in any worker, process or restart.
* Detection: with a ``sample_transform`` the loader also decodes each sample's ``.json`` (the targets the COCO
  source wrote) and calls ``sample_transform(image, target) -> (tensor, target)`` under the same seeded draws;
  a batch is then ``(images, list of targets)``, ``None`` marking a padded slot (``remainder="pad"``).
* A corrupt sample (undecodable image, label that is not an integer in range, sample missing from a truncated or
  damaged tar) is skipped, counted in :class:`LoaderStats` and logged; its slot is filled with another sample of
  the same batch (with the slot's own augmentation draw), or, if the whole batch is unreadable, with the next
  readable sample of the worker's share. Batch counts and batch boundaries never move, so resume stays exact.
* **Mixtures** (``{url: weight}``): every epoch holds each source in its weight's share, interleaved evenly, each
  source read as its own stream of passes over its shards (:class:`data.sampling.MixtureOrder`); the samples
  served per source are counted (``ShardLoader.source_samples``) and resume with the rest of the state.
* Transient read errors are retried with exponential backoff; a missing shard, an unreachable bucket or a
  manifest sha256 mismatch (``verify=True``) raises a :class:`~data.storage.DataSourceError` naming the URL.

Resume (``state_dict()`` / ``load_state_dict()``): the state holds the epoch, the batches consumed per rank in the
current epoch (the same on every rank, so rank 0's state is enough) and the layout it was produced under.

* **Same canonical layout** (canonical ranks and batch, worker count, remainder, shuffle window), on any world size
  that can read it (:attr:`LoaderConfig.canonical`; another accumulation or micro-batch, the same samples per step):
  the state's position is converted to steps, and each worker skips its consumed batches by index: tar members
  before its current shuffle window are passed over at the header level, and no skipped sample is decoded. The rest
  of the epoch is exactly the sequence of samples, and of augmentation draws, of an uninterrupted run.
* **Another layout** (e.g. another world size): the slots consumed under the old layout are recomputed from the
  state, removed from the epoch's pool, and the rest is split anew. **Bound:** no sample of the epoch is repeated,
  and at most ``world_size * batch_size - 1`` samples of the remaining pool (new layout; the same bound as the
  remainder dropped in every epoch) are skipped for the rest of that epoch; with ``remainder="wrap"``/``"pad"``
  none are skipped and fewer than ``world_size * batch_size`` are served twice (``"pad"`` labels those -1). A
  corrupt sample's replacement is a repeat by construction (one per corrupt sample).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.utils.data
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor
from webdataset.autodecode import basichandlers

from data.batch import Batch, Labels, LoaderStats
from data.manifest import DataSpec, ShardSet, check_shards_exist, resolve_shards, verify_shards
from data.pixels import pil_rgb8, tensor_rgb8
from data.reader import MissingSample, RawSample, ShardReader
from data.sampling import (
    EpochOrder,
    Layout,
    MixtureOrder,
    RankPlan,
    RankView,
    Remainder,
    Segment,
    WorkerShare,
    remaining_pool,
    sample_seed,
    worker_share,
)
from data.storage import DataSourceError, RetryPolicy, register_fsspec_schemes
from data.transforms import ImageTransform, seeded_rng, to_tensor_transform

log = logging.getLogger(__name__)

IGNORE_LABEL = -1
"""Label of padded slots (``remainder="pad"``) and of unlabeled detection images; use as ``ignore_index``."""
SampleTransform = Callable[[PIL.Image.Image, dict[str, Any]], tuple[torch.Tensor, Any]]
"""A per-sample transform of an image and its ``.json`` target (detection): returns the image tensor and the
transformed target. It must not modify its inputs (a replacement slot shares them with the slot it copies)."""
Image = PIL.Image.Image | torch.Tensor
"""A decoded image: PIL, or an RGB uint8 ``(3, H, W)`` tensor (``LoaderConfig.decode="tensor"``)."""
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
STATE_VERSION = 2  # 2: the rank view (world size, micro-batch, accumulation) beside the canonical layout
_READ_CHUNK = 1024  # samples read at once by a worker when shuffling is off

_TENSOR_DECODABLE = ("jpg", "jpeg", "png", "webp")
"""Formats ``torchvision.io.decode_image`` reads (libjpeg-turbo, libpng, libwebp); others go through PIL."""
Decode = Literal["pil", "tensor"]


def _decode_pil(data: bytes) -> PIL.Image.Image:
    """An RGB 8-bit PIL image (16-bit files scaled, :mod:`data.pixels`)."""
    with PIL.Image.open(io.BytesIO(data)) as image:
        image.load()
        return pil_rgb8(image)


def _decode_tensor(ext: str, data: bytes) -> torch.Tensor:
    """An RGB uint8 ``(3, H, W)`` tensor. torchvision's decoders with tensor transforms run about twice as fast as
    PIL's decode and resize at 224 px (bench/data_throughput.py); formats they lack are decoded by PIL."""
    if ext in _TENSOR_DECODABLE:
        return tensor_rgb8(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
    return pil_to_tensor(_decode_pil(data))


@dataclass(frozen=True)
class LoaderConfig:
    """How a rank streams its share of a shard set."""

    batch_size: int
    """Samples per batch on this rank."""
    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of data-parallel ranks."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the loader serves whole steps)."""
    canonical: tuple[int, int] | None = None
    """(ranks, batch size) the sample order is planned for (``data.canonical_ranks``). A run whose world size
    divides those ranks, whose micro-batch divides that batch size and whose steps hold a whole number of canonical
    batches per canonical rank trains step ``k`` on the same samples as the canonical run; otherwise (and with
    None) the order is planned for this run's own ranks and micro-batch."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the calling process)."""
    seed: int = 0
    """Run seed: shard order, shuffle windows and augmentation draws derive from it."""
    shuffle: bool = True
    """Shuffle shards and samples each epoch (off for evaluation)."""
    shuffle_window: int = 1024
    """Samples shuffled together inside a worker's block (rounded up to whole batches); each worker holds the raw
    bytes of this many samples."""
    remainder: Remainder = "drop"
    """Samples that do not fill a batch on every rank: "drop", "wrap" (repeat from the start), "pad" (as wrap,
    label -1)."""
    label_field: str | None = None
    """For samples without ``.cls``: the field of their ``.json`` that holds the integer class."""
    decode: Decode = "pil"
    """What the transform receives: a PIL image, or ``"tensor"``, an RGB uint8 ``(3, H, W)`` tensor decoded by
    torchvision (about twice the throughput with torchvision v2 transforms, which take either; pretraining uses it)."""
    require_labels: bool = True
    """Every sample must carry a ``.cls`` label (else it is skipped as unusable); False for pretraining, where a
    sample without one is labeled ``IGNORE_LABEL``."""
    verify: bool = False
    """Read every shard at build time and check its sha256 against the manifest."""
    check_shards: bool = True
    """List the shard directories at build time: a missing shard or wrong size fails before training starts."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of transient read errors."""
    storage_options: Mapping[str, Any] | None = None
    """fsspec options (e.g. ``{"endpoint_url": ...}``); by default the AWS environment configures S3."""
    pin_memory: bool = False
    """Pin batch memory (for GPU training)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    multiprocessing_context: str | None = None
    """Worker start method ("fork", "spawn", "forkserver"); None = torch default."""
    worker_ignored_signals: tuple[int, ...] = ()
    """Signals that worker processes ignore: the trainer's main process handles preemption signals (SIGUSR2,
    SIGTERM) at a step boundary, and a worker killed by one would abort the run before it can save."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} must be in [0, world_size={self.world_size})")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_window < 0:
            raise ValueError(f"shuffle_window must be >= 0, got {self.shuffle_window}")
        if self.remainder not in ("drop", "wrap", "pad"):
            raise ValueError(f"remainder {self.remainder!r}: choose 'drop', 'wrap' or 'pad'")

        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")

    def _layout(self, ranks: int, batch_size: int) -> Layout:
        window = 0
        if self.shuffle and self.shuffle_window:
            window = -(-self.shuffle_window // batch_size) * batch_size
        return Layout(ranks, max(1, self.num_workers), batch_size, self.remainder, window)

    @property
    def view(self) -> RankView:
        """The canonical layout (:attr:`canonical`) and how this run's ranks read it, or, when they cannot, the
        layout of this run's own ranks."""
        if self.canonical is not None:
            layout = self._layout(*self.canonical)
            if RankView.fits(layout, self.world_size, self.batch_size, self.grad_accum):
                return RankView(layout, self.world_size, self.batch_size, self.grad_accum)
        return RankView.identity(self._layout(self.world_size, self.batch_size), self.grad_accum)

    @property
    def layout(self) -> Layout:
        """The slot layout the sample order is planned for (canonical when this run can read it)."""
        return self.view.layout


class UnusableSampleError(Exception):
    """A sample that cannot be served (bad image, bad label, lost in a damaged tar); ``kind`` names its counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def decode_sample(
    raw: RawSample | MissingSample,
    num_classes: int | None,
    require_label: bool = True,
    label_field: str | None = None,
    decode: Decode = "pil",
) -> tuple[Image, int, str]:
    """Decode a raw sample into (RGB image, label, key): a PIL image by webdataset's handlers, or with
    ``decode="tensor"`` a uint8 ``(3, H, W)`` tensor by torchvision's decoders.

    Raises :class:`UnusableSampleError` when the image does not decode or the label is not an integer in range. A
    sample without ``.cls`` takes its label from ``label_field`` of its ``.json`` when given; otherwise it is unusable
    when ``require_label``, else (pretraining) labeled :data:`IGNORE_LABEL`.
    """
    if isinstance(raw, MissingSample):
        raise UnusableSampleError("truncated", raw.reason)
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw.files), None)
    if ext is None:
        raise UnusableSampleError("bad_image", f"no image member (have {sorted(raw.files)})")
    if "cls" not in raw.files and label_field is not None and "json" in raw.files:
        try:
            value = json.loads(raw.files["json"])[label_field]
        except (ValueError, KeyError, TypeError) as exc:
            raise UnusableSampleError("bad_label", f".json has no integer field {label_field!r}: {exc}") from exc
        raw = RawSample(raw.key, {**raw.files, "cls": str(value).encode()}, raw.url)
    if "cls" not in raw.files:
        if require_label:
            raise UnusableSampleError("bad_label", "no .cls member")
        raw = RawSample(raw.key, {**raw.files, "cls": str(IGNORE_LABEL).encode()}, raw.url)
    try:
        label = basichandlers(".cls", raw.files["cls"])
    except ValueError as exc:
        raise UnusableSampleError("bad_label", f".cls is not an integer: {raw.files['cls'][:20]!r}") from exc
    if not isinstance(label, int) or label < IGNORE_LABEL or (num_classes is not None and label >= num_classes):
        raise UnusableSampleError("bad_label", f"label {label!r} outside [-1, {num_classes})")
    try:
        image = _decode_tensor(ext, raw.files[ext]) if decode == "tensor" else _decode_pil(raw.files[ext])
    except Exception as exc:  # PIL and torchvision raise many types for bad bytes
        raise UnusableSampleError("bad_image", f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(image, PIL.Image.Image | torch.Tensor):
        raise UnusableSampleError("bad_image", f"webdataset did not decode .{ext} to an image")
    return image, label, raw.key


def decode_target(raw: RawSample) -> dict[str, Any]:
    """The sample's ``.json`` metadata (detection targets), or :class:`UnusableSampleError` ("bad_label")."""
    if "json" not in raw.files:
        raise UnusableSampleError("bad_label", f"no .json member (have {sorted(raw.files)})")
    try:
        target = json.loads(raw.files["json"])
    except ValueError as exc:
        raise UnusableSampleError("bad_label", f".json does not parse: {exc}") from exc
    if not isinstance(target, dict):
        raise UnusableSampleError("bad_label", f".json holds a {type(target).__name__}, not an object")
    return target


_Decoded = tuple["Image", int, str, dict[str, Any] | None]
"""A decoded sample: image, label, key and (with a sample transform) its ``.json`` target."""
"""A batch's labels: a tensor, or the list of targets (``None`` for padded slots) with a sample transform."""


def _ignore_signals(signals: tuple[int, ...], _worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class _StreamSpec:
    """What a worker needs to produce its batches (picklable for spawn/forkserver workers): the loader's config, the
    shard set's plan inputs and the position in the epoch."""

    config: LoaderConfig
    urls: list[str]
    sizes: list[int]
    shard_sources: list[int]
    weights: list[float] | None
    num_classes: int | None
    epoch: int
    history: list[Segment]
    position: int
    transform: ImageTransform
    sample_transform: SampleTransform | None

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def view(self) -> RankView:
        return self.config.view


def _plan(spec: _StreamSpec) -> tuple[EpochOrder | MixtureOrder, RankPlan]:
    order: EpochOrder | MixtureOrder
    if spec.weights is None:
        order = EpochOrder(spec.sizes, spec.seed, spec.epoch, spec.config.shuffle)
    else:
        order = MixtureOrder(spec.sizes, spec.shard_sources, spec.weights, spec.seed, spec.epoch, spec.config.shuffle)
    pool = remaining_pool(order.total, spec.history, seed=spec.seed, epoch=spec.epoch)
    return order, RankPlan(pool=pool, view=spec.view, segment=len(spec.history), position=spec.position)


@dataclass
class _ShareReads:
    """One logical worker share of one canonical rank as a physical worker reads it: its readers (one per mixture
    source, each keeping its stream open) and the shuffle window it holds."""

    canonical_rank: int
    logical: int
    share: WorkerShare
    readers: dict[int, ShardReader] = field(default_factory=dict)
    window_index: int = -1
    window: dict[int, RawSample | MissingSample] = field(default_factory=dict)


class _WorkerStream:
    """The micro-batches one dataloader worker makes for the rest of the epoch: this rank's micro-batch ``i`` comes
    from worker ``(i - position) % W`` (the order the DataLoader collects in, starting at worker 0), and is a piece
    of a canonical batch of one of the canonical ranks this rank serves, read from that canonical rank's share."""

    def __init__(self, spec: _StreamSpec, physical: int) -> None:
        self.spec = spec
        self.order, self.plan = _plan(spec)
        self.micro = range(self.plan.position + physical, self.plan.num_batches, self.plan.layout.num_workers)
        self.stats = LoaderStats()
        self.source_of = np.asarray(spec.shard_sources, dtype=np.int64)
        self._shares: dict[tuple[int, int], _ShareReads] = {}

    def _share(self, canonical_rank: int, logical: int) -> _ShareReads:
        key = (canonical_rank, logical)
        if key not in self._shares:
            share = worker_share(
                self.plan.pool,
                self.plan.layout,
                canonical_rank,
                logical,
                seed=self.spec.seed,
                epoch=self.spec.epoch,
                segment=self.plan.segment,
            )
            self._shares[key] = _ShareReads(canonical_rank, logical, share)
        return self._shares[key]

    def _count_retry(self) -> None:
        self.stats.retries += 1

    def _decode(self, raw: RawSample | MissingSample) -> _Decoded:
        spec = self.spec
        cfg = spec.config
        image, label, key = decode_sample(raw, spec.num_classes, cfg.require_labels, cfg.label_field, cfg.decode)
        target = None
        if self.spec.sample_transform is not None:
            assert isinstance(raw, RawSample)  # decode_sample raised for a missing one
            target = decode_target(raw)
        return image, label, key, target

    def _fetch(
        self, readers: dict[int, ShardReader], positions: np.ndarray, count_retries: bool = True
    ) -> dict[int, RawSample | MissingSample]:
        """Raw samples at global ``positions``: shard by shard in the order the positions reach them, each shard's
        members in one forward pass, each mixture source through its own reader."""
        unique = np.unique(positions)
        shards, members = self.order.locate(unique)
        out: dict[int, RawSample | MissingSample] = {}
        _, first = np.unique(shards, return_index=True)
        for shard in shards[np.sort(first)].tolist():
            at = np.flatnonzero(shards == shard)
            source = int(self.source_of[shard])
            if source not in readers:
                readers[source] = ShardReader(
                    self.spec.urls,
                    storage_options=self.spec.config.storage_options,
                    retry=self.spec.config.retry,
                    on_retry=self._count_retry if count_retries else None,
                )
            got = readers[source].read(shard, members[at].tolist())
            for pos, member in zip(unique[at].tolist(), members[at].tolist(), strict=True):
                out[pos] = got[member]
        return out

    def _raw_batch(self, reads: _ShareReads, t: int) -> dict[int, RawSample | MissingSample]:
        """Raw samples of the share's local batch ``t``; its whole shuffle window is read once and kept."""
        bs = reads.share.batch_size
        # Without shuffling, still read in bounded chunks of whole batches (memory stays O(window)).
        window = reads.share.window or bs * max(1, _READ_CHUNK // bs)
        k = (t * bs) // window
        if k != reads.window_index:
            reads.window = self._fetch(reads.readers, reads.share.positions[k * window : (k + 1) * window])
            reads.window_index = k
        return reads.window

    def _first_good_after(self, reads: _ShareReads, t: int) -> _Decoded:
        """The next decodable sample of the share after batch ``t`` (cyclic), for a batch with no good sample.

        Depends only on the share, not on what this process has read before, so a resumed run picks the same.
        """
        share = reads.share
        bs = share.batch_size
        order = np.concatenate([share.positions[(t + 1) * bs :], share.positions[: t * bs]])
        chunk = max(share.window, bs)
        readers: dict[int, ShardReader] = {}
        try:
            for lo in range(0, len(order), chunk):
                raws = self._fetch(readers, order[lo : lo + chunk], count_retries=False)
                for pos in order[lo : lo + chunk].tolist():
                    self.stats.decoded += 1
                    try:
                        return self._decode(raws[pos])
                    except UnusableSampleError:
                        continue
        finally:
            for reader in readers.values():
                reader.close()
        raise DataSourceError(
            f"canonical rank {reads.canonical_rank} worker {reads.logical}: none of the {len(share.positions)} samples "
            f"of its share in epoch {self.spec.epoch} can be decoded (shards: {self.spec.urls[:3]}...)"
        )

    def batches(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        """Yield ``(batch, meta)`` for the worker's remaining micro-batches in order."""
        try:
            for micro in self.micro:
                yield self._make_batch(micro)
        finally:
            for reads in self._shares.values():
                for reader in reads.readers.values():
                    reader.close()

    def _make_batch(self, micro: int) -> tuple[Batch, dict[str, Any]]:
        spec, view = self.spec, self.plan.view
        canonical_rank, j, piece = view.locate(spec.config.rank, micro)
        reads = self._share(canonical_rank, j % view.layout.num_workers)
        t = j // view.layout.num_workers
        positions, padded = reads.share.batch(t)
        cut = slice(piece * view.batch_size, (piece + 1) * view.batch_size)
        positions, padded = positions[cut], padded[cut]
        raws = self._raw_batch(reads, t)
        decoded: list[_Decoded | None] = []
        for pos in positions.tolist():
            raw = raws[pos]
            self.stats.decoded += 1
            try:
                decoded.append(self._decode(raw))
            except UnusableSampleError as bad:
                setattr(self.stats, bad.kind, getattr(self.stats, bad.kind) + 1)
                key = raw.key if isinstance(raw, RawSample) else f"#{pos}"
                log.warning("skipping sample %s of %s: %s", key, raw.url, bad)
                decoded.append(None)
        good = [d for d in decoded if d is not None]
        filled: list[_Decoded] = []
        fallback = None
        for i, item in enumerate(decoded):
            if item is None:
                self.stats.replaced += 1
                if good:  # another sample of the same batch, cycling; its slot seed gives it a new crop
                    item = good[(i - sum(1 for d in decoded[:i] if d is not None)) % len(good)]
                else:
                    fallback = fallback or self._first_good_after(reads, t)
                    item = fallback
            filled.append(item)
        images, labels, targets, keys = [], [], [], []
        for pos, pad, (image, label, key, target) in zip(positions.tolist(), padded.tolist(), filled, strict=True):
            with seeded_rng(sample_seed(spec.seed, spec.epoch, pos)):
                if spec.sample_transform is None:
                    images.append(spec.transform(image))
                else:
                    assert target is not None and isinstance(image, PIL.Image.Image)  # detection decodes to PIL
                    tensor, target = spec.sample_transform(image, target)
                    images.append(tensor)
            labels.append(IGNORE_LABEL if pad else label)
            targets.append(None if pad else target)
            keys.append(key)
        self.stats.samples += len(filled)
        try:
            batch = torch.stack(images)
        except RuntimeError as exc:
            raise ValueError(
                f"images of one batch have different shapes ({sorted({tuple(i.shape) for i in images})}): "
                "use a transform that resizes to a fixed size (e.g. data.transforms.pretrain_transform)"
            ) from exc
        shards, _ = self.order.locate(positions)
        meta = {"batch": micro, "stats": self.stats.as_dict()}
        self.stats = LoaderStats()  # the main process accumulates deltas
        out: Labels = targets if spec.sample_transform is not None else torch.tensor(labels, dtype=torch.long)
        return Batch(batch, out, keys, spec.epoch, self.source_of[shards].tolist()), meta


class _EpochDataset(torch.utils.data.IterableDataset):
    """IterableDataset over the micro-batches of one rank; DataLoader worker ``p`` makes every ``W``-th one (see
    :class:`_WorkerStream`)."""

    def __init__(self, spec: _StreamSpec) -> None:
        self.spec = spec

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        # Spawned/forkserver workers start with webdataset's default table: register here, in the worker.
        register_fsspec_schemes()
        info = torch.utils.data.get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if count != self.spec.view.layout.num_workers:
            raise RuntimeError(f"dataset planned for {self.spec.view.layout.num_workers} workers runs on {count}")
        return _WorkerStream(self.spec, physical).batches()


class ShardLoader:
    """Iterable over the batches (:class:`~data.batch.Batch`) of one rank; ``len()`` is batches per epoch, the same
    on every rank.

    ``batch.labels`` is a tensor, or with a ``sample_transform`` (detection) the list of the slots' targets.

    Call :meth:`set_epoch` before each epoch. An epoch that is iterated to its end advances the loader to the next
    epoch; an interrupted one continues where it stopped on the next ``iter()``. A trainer loop::

        loader.load_state_dict(checkpoint["loader"])  # optional: resume
        for epoch in range(loader.epoch, num_epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                ...  # checkpoint["loader"] = loader.state_dict() at any step
    """

    def __init__(
        self,
        shards: ShardSet,
        config: LoaderConfig,
        transform: ImageTransform | None = None,
        epoch: int = 0,
        sample_transform: SampleTransform | None = None,
    ) -> None:
        if transform is not None and sample_transform is not None:
            raise ValueError("give either transform (image only) or sample_transform (image and .json target)")
        self.shards = shards
        self.config = config
        self.transform: ImageTransform = transform or to_tensor_transform()
        self.sample_transform = sample_transform
        self.epoch = epoch
        self.stats = LoaderStats()
        """Counters of skipped samples, replacements and retries (this rank)."""
        self.source_samples = [0] * len(shards.source_sizes())
        """Samples this rank served from each mixture source (carried in the state)."""
        self._position = 0
        self._history: list[Segment] = []
        if len(self) == 0:
            raise ValueError(
                f"{shards.num_samples} samples cannot give one batch per rank with world_size={config.world_size} "
                f"and batch_size={config.batch_size}: use a smaller batch, fewer ranks, or remainder='wrap'/'pad'"
            )

    @property
    def source_names(self) -> list[str]:
        """The mixture's sources in order (empty without a mixture)."""
        return [source.name for source in self.shards.mixture or []]

    @property
    def num_samples(self) -> int:
        """Samples in the shard set."""
        return self.shards.num_samples

    def __len__(self) -> int:
        """Micro-batches per epoch on every rank (for a whole epoch under the current layout)."""
        return self.config.view.batches(self.num_samples)

    @property
    def position(self) -> int:
        """Batches consumed in the current epoch (in the current layout segment)."""
        return self._position

    @property
    def remaining(self) -> int:
        """Batches left in the current epoch (after a layout change this differs from ``len - position``)."""
        return _plan(self._spec())[1].remaining

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a different epoch than the current one starts at its beginning."""
        if epoch != self.epoch:
            self.epoch, self._position, self._history = epoch, 0, []

    def skip(self, batches: int) -> None:
        """Pass over the next ``batches`` batches without reading them (a rollback's skipped samples), into later
        epochs when the current one ends; workers start at the new position by index."""
        while batches > 0:
            left = self.remaining
            if batches < left:
                self._position += batches
                return
            batches -= left
            self.epoch, self._position, self._history = self.epoch + 1, 0, []

    def _spec(self) -> _StreamSpec:
        return _StreamSpec(
            config=self.config,
            urls=[s.url for s in self.shards.shards],
            sizes=[s.info.num_samples for s in self.shards.shards],
            shard_sources=[s.source for s in self.shards.shards],
            weights=[m.weight for m in self.shards.mixture] if self.shards.mixture else None,
            num_classes=self.shards.num_classes,
            epoch=self.epoch,
            history=list(self._history),
            position=self._position,
            transform=self.transform,
            sample_transform=self.sample_transform,
        )

    def __iter__(self) -> Iterator[Batch]:
        spec = self._spec()
        _, plan = _plan(spec)
        expected = plan.num_batches
        if self._position < expected:
            batches = self._batches(spec)
            try:
                for batch, meta in batches:
                    if meta["batch"] != self._position:
                        raise RuntimeError(
                            f"rank {self.config.rank}: got batch {meta['batch']} where {self._position} was due; "
                            "the DataLoader no longer collects from workers round-robin"
                        )
                    self._position += 1
                    self.stats.add(meta["stats"])
                    for source in batch.sources:
                        self.source_samples[source] += 1
                    yield batch
            finally:
                # Stop the workers now, also on errors and early exits. Left to garbage collection (a traceback
                # keeps the DataLoader iterator alive), the shutdown runs inside gc and stalls ~5 s per worker.
                shutdown = getattr(batches, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                del batches
            if self._position != expected:
                raise RuntimeError(f"rank {self.config.rank}: {self._position} batches of {expected} were produced")
        self.epoch, self._position, self._history = self.epoch + 1, 0, []

    def _batches(self, spec: _StreamSpec) -> Iterator[tuple[Batch, dict[str, Any]]]:
        """The rank's remaining batches with their metadata, from worker processes or in this process."""
        dataset = _EpochDataset(spec)
        if self.config.num_workers == 0:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.config.num_workers,
            pin_memory=self.config.pin_memory,
            prefetch_factor=self.config.prefetch_factor,
            multiprocessing_context=self.config.multiprocessing_context,
            worker_init_fn=functools.partial(_ignore_signals, self.config.worker_ignored_signals),
            persistent_workers=False,  # the plan changes every epoch; workers receive it at start
        )
        return iter(loader)

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position and layout (identical on all ranks) plus this rank's counters."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self._position,
            "seed": self.config.seed,
            "shuffle": self.config.shuffle,
            "num_samples": self.num_samples,
            "layout": self.config.layout.to_dict(),
            "view": self.config.view.to_dict(),
            "history": [{"layout": s.layout.to_dict(), "consumed": s.consumed} for s in self._history],
            "stats": self.stats.as_dict(),
            "mixture": self._mixture(),
            "source_samples": list(self.source_samples),
        }

    def _mixture(self) -> list[list[Any]] | None:
        mixture = self.shards.mixture
        return [[m.spec, m.weight] for m in mixture] if mixture else None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``. Another view of the same canonical layout (another world size that divides the
        canonical ranks, with the same samples per step) continues at the same step; a state from another layout
        (world size, workers, batch) is re-planned."""
        version = int(state.get("version", 0))
        if version not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for name, mine in (("seed", self.config.seed), ("shuffle", self.config.shuffle)):
            if state[name] != mine:
                raise ValueError(
                    f"loader state has {name}={state[name]!r} but the loader is configured with {mine!r}: "
                    f"resume with the run's original {name}"
                )
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"loader state is for {state['num_samples']} samples, the shard set has {self.num_samples}: "
                "the data changed since the checkpoint"
            )
        if state.get("mixture") != self._mixture():
            raise ValueError(
                f"loader state was made with the mixture {state.get('mixture')}, the loader reads "
                f"{self._mixture()}: resume with the run's original data.train_url (sources and weights)"
            )
        history = [Segment(Layout.from_dict(s["layout"]), int(s["consumed"])) for s in state["history"]]
        old_layout, view = Layout.from_dict(state["layout"]), self.config.view
        position = int(state["position"])
        # A state written before rank views counts batches of its layout's own ranks.
        old_view = RankView.identity(old_layout) if version == 1 else RankView.from_dict(old_layout, state["view"])
        if old_layout == view.layout and old_view != view:  # the same sample order, read by other ranks
            served = old_view.consumed(position)  # canonical batches per canonical rank, whole steps
            steps = served // view.canonical_accum
            partial = position - steps * view.canonical_accum * old_view.accum // old_view.canonical_accum
            position = steps * view.accum
            if (old_view.world_size, old_view.batch_size) != (view.world_size, view.batch_size):
                log.info(
                    "loader: epoch %d continues at step %d of the same sample order on %d ranks x %d micro-batches "
                    "of %d (was %d x %d x %d)%s", state["epoch"], steps, view.world_size, view.accum,
                    view.batch_size, old_view.world_size, old_view.accum, old_view.batch_size,
                    f"; the {partial} micro-batches of a partly served step are served again" if partial else "",
                )  # fmt: skip
        elif old_layout != view.layout and position > 0:
            history.append(Segment(old_layout, old_view.consumed(position)))
            position = 0
            log.info("loader: epoch %d re-planned for layout %s (was %s)", state["epoch"], view.layout, old_layout)
        self.epoch, self._position, self._history = int(state["epoch"]), position, history
        self.stats = LoaderStats(**{k: int(v) for k, v in dict(state.get("stats", {})).items()})
        self.source_samples = [int(n) for n in state.get("source_samples", self.source_samples)]
        # Validates the history against the data (raises if the state belongs to another set).
        _plan(self._spec())


def build_loader(
    source: DataSpec | ShardSet,
    config: LoaderConfig,
    *,
    transform: ImageTransform | None = None,
    sample_transform: SampleTransform | None = None,
    epoch: int = 0,
    index_dir: str | None = None,
) -> ShardLoader:
    """Build the loader of one rank from a data spec (:data:`data.manifest.DataSpec`: a manifest URL, a shard
    directory, a brace pattern, a list of those or of shard URLs, a weighted mixture) or a :class:`ShardSet`.
    ``index_dir`` is where indexes of shards without a manifest may also be cached (a run's ``index/``).

    Reads the manifest (and checks the shards exist) before returning. ``sample_transform`` replaces ``transform``
    for detection: it receives the image and the sample's ``.json``, and the batches carry lists of targets.
    """
    register_fsspec_schemes()
    shards = (
        source
        if isinstance(source, ShardSet)
        else resolve_shards(source, storage_options=config.storage_options, retry=config.retry, index_dir=index_dir)
    )
    if not shards.shards:
        raise ValueError(f"{source}: the manifest lists no shards")
    if config.check_shards:
        check_shards_exist(shards, storage_options=config.storage_options, retry=config.retry)
    if config.verify:
        verify_shards(shards, storage_options=config.storage_options, retry=config.retry)
    return ShardLoader(shards, config, transform, epoch, sample_transform)


__all__ = [
    "IGNORE_LABEL",
    "LoaderConfig",
    "LoaderStats",
    "SampleTransform",
    "ShardLoader",
    "UnusableSampleError",
    "build_loader",
    "decode_sample",
    "decode_target",
]
