"""The streaming loader on real local shards: balance across ranks, exact resume, corruption, errors, seeding."""

from __future__ import annotations

import io
import random
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import PIL.Image
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from data.loader import IGNORE_LABEL, LoaderConfig, ShardLoader, build_loader
from data.manifest import read_manifest, write_manifest
from data.sampling import Layout
from data.storage import MissingShardError, RetryPolicy, ShardIntegrityError
from data.transforms import pretrain_transform
from tests.support.shards import write_folder_shards

Batch = tuple[list[str], torch.Tensor, torch.Tensor]


def run(loader: ShardLoader, epochs: range, stop_after: int | None = None) -> list[Batch]:
    """Iterate ``epochs`` (calling set_epoch like a trainer), optionally stopping after ``stop_after`` batches."""
    out: list[Batch] = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append((batch.keys, batch.images, batch.labels))
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


def keys_of(batches: list[Batch]) -> list[str]:
    return [k for keys, _, _ in batches for k in keys]


def test_every_rank_yields_the_same_number_of_full_batches_with_uneven_shards(
    tmp_path: Path, image_folder: Path
) -> None:
    out = str(tmp_path / "set")
    manifest = write_folder_shards(image_folder, out, samples_per_shard=13)
    assert [s.num_samples for s in manifest.shards] == [13, 13, 13, 13, 8]  # 5 shards < 3 ranks x 2 workers
    world, batch = 3, 3
    per_rank = []
    for rank in range(world):
        loader = build_loader(out, LoaderConfig(batch_size=batch, rank=rank, world_size=world, num_workers=2, seed=5))
        assert len(loader) == 60 // (world * batch) == 6
        batches = run(loader, range(1))
        assert len(batches) == 6 and all(len(keys) == batch for keys, _, _ in batches)
        per_rank.append(keys_of(batches))
    served = [k for keys in per_rank for k in keys]
    assert len(served) == len(set(served))  # no sample served twice in the epoch
    assert 60 - len(served) < world * batch  # the documented per-epoch remainder bound

    # remainder="pad": every sample exactly once, the padding slots labelled IGNORE_LABEL.
    real: list[str] = []
    for rank in range(world):
        loader = build_loader(out, LoaderConfig(batch_size=batch, rank=rank, world_size=world, seed=5, remainder="pad"))
        assert len(loader) == 7
        for keys, _, labels in run(loader, range(1)):
            real += [k for k, label in zip(keys, labels.tolist(), strict=True) if label != IGNORE_LABEL]
    assert sorted(real) == sorted(k for k in _all_keys(out))


def _all_keys(directory: str) -> list[str]:
    keys = []
    for shard in read_manifest(directory).shards:
        with tarfile.open(Path(directory) / shard.name) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar})
    return keys


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_at_a_random_batch_reproduces_the_uninterrupted_sequence(any_shard_dir: str, rank: int) -> None:
    def make() -> ShardLoader:
        return build_loader(
            any_shard_dir,
            LoaderConfig(batch_size=3, rank=rank, world_size=2, num_workers=2, seed=11, shuffle_window=6),
            transform=pretrain_transform(8),
        )

    epochs = range(2)
    reference = run(make(), epochs)
    assert len(reference) == 2 * 10
    stop = random.Random(rank).randrange(1, len(reference) - 1)
    first = make()
    head = run(first, epochs, stop_after=stop)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    decoded_before = resumed.stats.decoded
    tail = run(resumed, range(state["epoch"], 2))
    sequence = head + tail
    assert keys_of(sequence) == keys_of(reference)
    for (_, ref_images, ref_labels), (_, images, labels) in zip(reference, sequence, strict=True):
        assert torch.equal(images, ref_images)  # same random crops and flips after the restart
        assert torch.equal(labels, ref_labels)
    # Skipping to the position decoded nothing: only served samples were decoded after the resume.
    assert resumed.stats.decoded - decoded_before == len(tail) * 3
    assert keys_of(reference[:10]) != keys_of(reference[10:])  # epochs are shuffled differently


def test_resume_on_other_world_sizes_repeats_nothing_and_skips_within_bound(any_shard_dir: str) -> None:
    shard_dir = any_shard_dir
    layouts = [(3, 2, 2), (2, 1, 3), (1, 0, 4)]  # (world_size, num_workers, batch_size), changed twice in epoch 0
    rng = random.Random(3)
    served: list[str] = []
    state: dict[str, Any] | None = None
    for step, (world, workers, batch) in enumerate(layouts):
        loaders = [
            build_loader(
                shard_dir, LoaderConfig(batch_size=batch, rank=r, world_size=world, num_workers=workers, seed=2)
            )
            for r in range(world)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        last = step == len(layouts) - 1
        stop = None if last else rng.randrange(1, loaders[0].remaining)
        for loader in loaders:
            got = run(loader, range(loader.epoch, loader.epoch + 1), stop_after=stop)
            if not last:
                assert len(got) == stop
            served += keys_of(got)
        state = loaders[0].state_dict()  # positions are the same on every rank: rank 0's state is enough
    assert len(served) == len(set(served)), "a sample was served twice in one epoch"
    world, _, batch = layouts[-1]
    assert 60 - len(served) <= world * batch - 1  # the bound documented in data.loader
    assert state is not None and state["epoch"] == 1 and state["position"] == 0


def _rewrite_tar(path: Path, edit: dict[str, bytes]) -> None:
    """Replace members of a tar (by member name), keeping member order."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = edit.get(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def _refresh_manifest(directory: Path) -> None:
    """Record the current size and hash of shard 1 (corrupt bytes that were in the source at write time)."""
    import dataclasses
    import hashlib

    manifest = read_manifest(str(directory))
    raw = (directory / manifest.shards[1].name).read_bytes()
    manifest.shards[1] = dataclasses.replace(
        manifest.shards[1], num_bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest()
    )
    write_manifest(str(directory), manifest)


def test_corrupt_image_wrong_label_and_truncated_tar_are_skipped_and_counted(
    tmp_path: Path, image_folder: Path
) -> None:
    out = tmp_path / "set"
    manifest = write_folder_shards(image_folder, str(out), samples_per_shard=10, shuffle_seed=None)
    shard1, shard3 = out / manifest.shards[1].name, out / manifest.shards[3].name
    with tarfile.open(shard1) as tar:
        keys1 = sorted({m.name.split(".")[0] for m in tar})
    _rewrite_tar(shard1, {f"{keys1[2]}.png": b"\x89PNG but not really", f"{keys1[5]}.cls": b"cat"})
    _refresh_manifest(out)
    # Truncate shard 3 inside the image data of its 5th sample: samples 4..9 are lost.
    with tarfile.open(shard3) as tar:
        members = tar.getmembers()
    cut = next(m for m in members if m.name.endswith(".png") and m.name.startswith(members[8].name.split(".")[0]))
    shard3.write_bytes(shard3.read_bytes()[: cut.offset_data + 20])

    # Up front, the size check names the truncated shard.
    with pytest.raises(ShardIntegrityError, match=re.escape(str(shard3))):
        build_loader(str(out), LoaderConfig(batch_size=2))

    def make() -> ShardLoader:
        # No shuffle: the lost samples fill whole batches, which exercises the cross-batch replacement too.
        return build_loader(
            str(out), LoaderConfig(batch_size=2, num_workers=2, shuffle=False, check_shards=False, seed=1)
        )

    loader = make()
    batches = run(loader, range(1))
    assert len(batches) == len(loader) == 30 and all(len(keys) == 2 for keys, _, _ in batches)
    assert (loader.stats.bad_image, loader.stats.bad_label, loader.stats.truncated) == (1, 1, 6)
    assert loader.stats.replaced == 8 and loader.stats.samples == 60
    served = set(keys_of(batches))
    assert keys1[2] not in served and keys1[5] not in served
    # torchvision's decoders (pretraining's tensor decode) refuse the same bytes, counted the same way.
    tensors = build_loader(
        str(out), LoaderConfig(batch_size=2, num_workers=2, shuffle=False, check_shards=False, seed=1, decode="tensor")
    )
    assert keys_of(run(tensors, range(1))) == keys_of(batches)
    assert tensors.stats.as_dict() == loader.stats.as_dict()
    # The same data gives the same replacements after a resume in the middle of the damaged region.
    again = make()
    head = run(again, range(1), stop_after=18)
    resumed = make()
    resumed.load_state_dict(again.state_dict())
    assert keys_of(head + run(resumed, range(1))) == keys_of(batches)


def test_missing_shard_is_an_error_naming_its_url(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "set"
    manifest = write_folder_shards(image_folder, str(out), samples_per_shard=20)
    missing = out / manifest.shards[1].name
    missing.unlink()
    with pytest.raises(MissingShardError, match=re.escape(str(missing))):
        build_loader(str(out), LoaderConfig(batch_size=4))
    # Also when the shard disappears after the loader was built (raised from inside a worker).
    loader = build_loader(str(out), LoaderConfig(batch_size=4, num_workers=1, check_shards=False, shuffle=False))
    with pytest.raises(MissingShardError, match=re.escape(str(missing))):
        run(loader, range(1))


def test_verify_detects_a_sha256_mismatch(tmp_path: Path, shard_dir: str) -> None:
    out = tmp_path / "set"
    shutil.copytree(shard_dir, out)
    shard = out / read_manifest(str(out)).shards[2].name
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(raw))
    assert len(build_loader(str(out), LoaderConfig(batch_size=4))) == 15  # the cheap size check cannot see it
    with pytest.raises(ShardIntegrityError, match=re.escape(str(shard)) + ".*sha256"):
        build_loader(str(out), LoaderConfig(batch_size=4, verify=True))


class _BreakingFile(io.RawIOBase):
    """A read stream whose connection 'drops' once after ``after`` bytes."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.left = inner, after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer (injected)")
        data = self.inner.read(min(len(buffer), self.left))
        self.left -= len(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


class FlakyFileSystem(LocalFileSystem):
    """Local files behind a connection that drops in the middle of the first read of every shard."""

    protocol = "flaky"
    broken: ClassVar[set[str]] = set()

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        f = super()._open(path, mode, block_size, **kwargs)
        if mode == "rb" and path.endswith(".tar") and path not in self.broken:
            self.broken.add(path)
            return io.BufferedReader(_BreakingFile(f, after=5000))
        return f


def test_transient_read_errors_are_retried_and_reading_resumes_mid_shard(shard_dir: str) -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.broken.clear()
    retry = RetryPolicy(attempts=3, base_delay_s=0.001)
    clean = build_loader(shard_dir, LoaderConfig(batch_size=4, seed=4, shuffle_window=8))
    flaky = build_loader(f"flaky://{shard_dir}", LoaderConfig(batch_size=4, seed=4, shuffle_window=8, retry=retry))
    assert keys_of(run(flaky, range(1))) == keys_of(run(clean, range(1)))
    assert flaky.stats.retries == len(read_manifest(shard_dir).shards)  # one drop per shard, each recovered
    assert flaky.stats.skipped == 0 and flaky.stats.samples == 60


def test_augmentation_draws_depend_on_the_sample_not_on_worker_or_layout(shard_dir: str) -> None:
    def crops(workers: int, epoch: int) -> dict[str, torch.Tensor]:
        loader = build_loader(
            shard_dir,
            LoaderConfig(batch_size=4, num_workers=workers, seed=9),
            transform=pretrain_transform(8),
            epoch=epoch,
        )
        return {
            k: img
            for keys, images, _ in run(loader, range(epoch, epoch + 1))
            for k, img in zip(keys, images, strict=True)
        }

    in_process, two_workers = crops(0, 0), crops(2, 0)
    assert in_process.keys() == two_workers.keys() and len(in_process) == 60
    assert all(torch.equal(in_process[k], two_workers[k]) for k in in_process)
    next_epoch = crops(0, 1)
    assert sum(not torch.equal(in_process[k], next_epoch[k]) for k in in_process) > 50


def test_state_from_another_run_is_rejected_with_the_setting_to_fix(shard_dir: str) -> None:
    loader = build_loader(shard_dir, LoaderConfig(batch_size=4, seed=1))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed=1 but the loader is configured with 2"):
        build_loader(shard_dir, LoaderConfig(batch_size=4, seed=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        build_loader(shard_dir, LoaderConfig(batch_size=40, world_size=2))
    assert Layout.from_dict(state["layout"]) == loader.config.layout


def test_tensor_decoding_gives_the_pil_crops(tmp_path: Path) -> None:
    """Pretraining decodes with torchvision into uint8 tensors (about twice the throughput, bench/data_throughput.py):
    the same seed draws the same crops and flips, and the pixels differ from PIL's decode-and-resize by resampling
    noise only; another seed (other crops) differs by far more under the same measure."""
    folder = tmp_path / "photos" / "class0"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:72, 0:96].astype(np.float32)
    for i in range(12):  # smooth content, as photographs are: gradients and a disc, JPEG q90
        disc = ((xx - 20 - 5 * i) ** 2 + (yy - 30) ** 2 < 200 + 40 * i) * 120.0
        pixels = np.stack([xx * 2 + disc, yy * 3 + 10 * i, 255 - xx - yy + disc / 2], axis=-1).clip(0, 255)
        PIL.Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i:02d}.jpg", quality=90)
    from data.sources import ImageFolderSource
    from data.writer import WriterConfig, write_shards

    write_shards(
        ImageFolderSource(tmp_path / "photos"), WriterConfig(str(tmp_path / "set"), samples_per_shard=5, progress=False)
    )

    def images(decode: str, seed: int) -> torch.Tensor:
        loader = build_loader(
            str(tmp_path / "set"),
            LoaderConfig(batch_size=4, seed=seed, decode=decode),
            transform=pretrain_transform(32),
        )
        return torch.cat([images for _, images, _ in run(loader, range(1))])

    pil, tensor, other = images("pil", 3), images("tensor", 3), images("tensor", 4)
    assert pil.shape == tensor.shape == (12, 3, 32, 32)
    same = (pil - tensor).abs().mean(dim=(1, 2, 3))
    different = (pil - other).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.02, same  # normalized units: about 1/255 of the pixel range
    assert different.mean() > 10 * same.mean(), (different.mean(), same.mean())


def test_16_bit_pngs_are_scaled_to_8_bits_by_both_decoders() -> None:
    """A 16-bit grayscale ramp (PIL mode I;16) decodes to the 8-bit ramp it stands for, through PIL and through
    torchvision (which hands out uint16); PIL's own RGB conversion, the control, clips it nearly white."""
    from data.loader import decode_sample
    from data.reader import RawSample

    wide = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    PIL.Image.fromarray(wide).save(buf, format="PNG")
    expected = np.round(wide / 257.0)
    raw = RawSample("ramp", {"png": buf.getvalue(), "cls": b"0"}, "mem://ramp.tar")
    pil, _, _ = decode_sample(raw, num_classes=1)
    tensor, _, _ = decode_sample(raw, num_classes=1, decode="tensor")
    assert isinstance(pil, PIL.Image.Image) and pil.mode == "RGB"
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8 and tensor.shape == (3, 64, 64)
    assert np.abs(np.asarray(pil)[..., 0].astype(float) - expected).max() <= 1
    assert np.abs(tensor[0].numpy().astype(float) - expected).max() <= 1
    assert np.asarray(pil).mean() == pytest.approx(127.5, abs=1)
    clipped = np.asarray(PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert clipped.mean() > 250  # what the loader gave before


def _step_sets(
    shard_dir: str,
    world: int,
    batch: int,
    accum: int,
    canonical: tuple[int, int] | None,
    state: dict[str, Any] | None = None,
    steps: int | None = None,
) -> tuple[list[list[str]], dict[str, Any]]:
    """Sorted keys of every optimizer step the ``world`` ranks serve (``steps`` of them, or the rest of the epoch),
    and rank 0's state after them."""
    loaders = []
    for rank in range(world):
        config = LoaderConfig(batch_size=batch, rank=rank, world_size=world, grad_accum=accum, canonical=canonical,
                              num_workers=2, seed=4)  # fmt: skip
        loaders.append(build_loader(shard_dir, config))
        if state is not None:
            loaders[-1].load_state_dict(state)
    per_rank = [run(loader, range(loader.epoch, loader.epoch + 1), None if steps is None else steps * accum)
                for loader in loaders]  # fmt: skip
    count = len(per_rank[0]) // accum
    sets = [sorted(k for got in per_rank for keys, _, _ in got[s * accum : (s + 1) * accum] for k in keys)
            for s in range(count)]  # fmt: skip
    return sets, loaders[0].state_dict()


def test_world_sizes_that_divide_the_canonical_ranks_train_every_step_on_the_same_samples(shard_dir: str) -> None:
    canonical = (4, 3)  # 4 canonical ranks x batches of 3: 12 samples a step, 5 steps in the 60-sample epoch
    reference, _ = _step_sets(shard_dir, 4, 3, 1, canonical)
    assert len(reference) == 5 and all(len(step) == 12 for step in reference)
    assert len({k for step in reference for k in step}) == 60  # every step distinct samples
    for world, batch, accum in [(2, 3, 2), (1, 3, 4), (2, 1, 6)]:  # fewer ranks, and a smaller micro-batch
        sets, _ = _step_sets(shard_dir, world, batch, accum, canonical)
        assert sets == reference, (world, batch, accum)
        # Negative control: the same world planned for its own ranks composes other steps.
        own, _ = _step_sets(shard_dir, world, batch, accum, None)
        assert own != reference and len(own) == len(reference), (world, batch, accum)

    # Shrink from 4 ranks to 1 after 2 steps, grow to 2 after one more: the uninterrupted steps, nothing re-planned.
    first, state = _step_sets(shard_dir, 4, 3, 1, canonical, steps=2)
    second, state = _step_sets(shard_dir, 1, 3, 4, canonical, state, steps=1)
    assert state["position"] == 3 * 4 and state["history"] == []  # 3 steps of 4 micro-batches on one rank
    rest, state = _step_sets(shard_dir, 2, 1, 6, canonical, state)
    assert first + second + rest == reference
    assert state["epoch"] == 1 and state["position"] == 0
    # A state written before rank views (version 1: positions in the batches of its own ranks) continues the same.
    first, state = _step_sets(shard_dir, 4, 3, 1, canonical, steps=2)
    old = {k: v for k, v in state.items() if k != "view"} | {"version": 1}
    rest, _ = _step_sets(shard_dir, 1, 3, 4, canonical, old)
    assert first + rest == reference
    # Negative control: without a canonical layout the shrink re-plans (a new segment), and the steps differ.
    first, state = _step_sets(shard_dir, 4, 3, 1, None, steps=2)
    second, state = _step_sets(shard_dir, 1, 3, 4, None, state, steps=1)
    assert len(state["history"]) == 1 and first + second != reference[:3]
