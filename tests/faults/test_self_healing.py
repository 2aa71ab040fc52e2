"""Runs that heal themselves: loss-spike rollback past a window of bad data, evaluations that give way to a
preemption save, checkpoints mirrored in the background, and checkpoints verified before a resume.

Real processes throughout: the launcher with 2 ranks on gloo, real Fashion-MNIST shards, moto's S3 server.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.support.launch import launch_cmd, logged_steps, preempt, run, start, wait_for
from tests.support.spikes import SHARD, calm, noise, seed_hitting_noise_once, write_shard
from trainer.resilience.checkpoint import LATEST, MARKER
from trainer.resilience.preemption import REQUEUE_EXIT_CODE
from trainer.run_dir import RunDir


@pytest.mark.slow
def test_a_loss_spike_from_a_window_of_noise_rolls_back_and_skips_it(tmp_path: Path) -> None:
    """20 shards of 8 in webdataset's layout, one of them noise, placed (by the run seed's shard order) in one
    batch of one rank at a step after the spike statistic's warm-up; pixel MSE without per-patch normalization so
    the noise stands out. The run rolls back to the checkpoint before it, skips the noise, and ends far below the
    spike; the same run with a calm shard in its place never rolls back."""
    clean, bad, good = tmp_path / "calm", tmp_path / "noise", tmp_path / "calm_too"
    for directory in (clean, bad, good):
        directory.mkdir()
    for shard in range(19):
        write_shard(
            clean / f"calm-{shard:03d}.tar", f"calm{shard:02d}_", [calm(shard * SHARD + i) for i in range(SHARD)]
        )
    noise_keys = write_shard(bad / "noise-000.tar", "noise", [noise(i) for i in range(SHARD)])
    write_shard(good / "calm-019.tar", "calm19_", [calm(19 * SHARD + i) for i in range(SHARD)])  # the control's 20th
    seed, noisy_step = seed_hitting_noise_once(20, bad=19)
    common = (
        f"seed={seed}", "data.batch_size=8", "data.shuffle_window=8", "schedule.max_steps=10",
        "model.norm_pix_loss=false", "checkpoint.every_steps=2", "checkpoint.keep=5",
        "schedule.spike_factor=3", "schedule.spike_window=3", "tracking.sample_ledger=true",
    )  # fmt: skip
    run_dir = tmp_path / "run"
    assert run(launch_cmd(run_dir, f"data.train_url=[{clean}, {bad}]", *common, ranks=2)) == 0
    (rollback,) = [json.loads(line) for line in RunDir(run_dir).rollbacks.read_text().splitlines()]
    assert rollback["cause"] == "loss spike" and rollback["detected_at_step"] == noisy_step
    assert rollback["restored_step"] == noisy_step - 1 - (noisy_step - 1) % 2  # the newest checkpoint before it
    assert rollback["skipped_steps"] == [rollback["restored_step"] + 1, noisy_step]
    assert set(noise_keys) <= set(rollback["skipped_keys"])
    from mlflow.tracking import MlflowClient  # the run's page shows the rollback: a tag, a metric, the ledger

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    mlflow_run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert mlflow_run.data.tags["rollbacks"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "train/rollbacks")] == [
        (noisy_step, 1.0)
    ]
    assert [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "rollbacks")] == ["rollbacks/rollbacks.jsonl"]
    losses = {r["step"]: r["loss"] for r in logged_steps(run_dir)}  # the last record of each step wins
    assert losses[10] < rollback["loss"] / 3  # the run ended far below the spike
    # Control: the same run with a calm shard in the noise's place never rolls back. (It also saves by the clock
    # instead of by steps, and its write-bandwidth estimate says a save cannot fit the warning window.)
    control_run = tmp_path / "control_run"
    timed = ("checkpoint.every_steps=1000", "checkpoint.every_minutes=0.005", "checkpoint.write_mb_per_s=0.1")
    log = tmp_path / "control.log"
    proc = start(launch_cmd(control_run, f"data.train_url=[{clean}, {good}]", *common, *timed, ranks=2), log)
    assert proc.wait(timeout=300) == 0
    assert not RunDir(control_run).rollbacks.exists()
    text = log.read_text()
    saved = [int(step) for step in re.findall(r"checkpoints/step_(\d+) saved in", text)]
    assert len(saved) >= 3 and saved[-1] == 10, saved  # every 0.3 s of training (steps take ~0.2 s), and the end
    estimated = re.search(r"a checkpoint save takes (\d+)s \(estimated\), more than 80% of the 120s", text)
    assert estimated is not None
    real = sum(f.stat().st_size for f in (control_run / "checkpoints" / "step_00000010").rglob("*") if f.is_file())
    assert int(estimated[1]) * 0.1e6 == pytest.approx(real, rel=0.1)  # size over 0.1 MB/s: the estimate is honest


def _first_line(log: Path, pattern: str) -> re.Match[str] | None:
    return re.search(pattern, log.read_text()) if log.exists() else None


@pytest.mark.slow
def test_a_signal_during_an_evaluation_saves_and_exits_within_the_window(
    tmp_path: Path, fmnist_shards: str, fmnist_test_shards: str
) -> None:
    """Fine-tuning at 224 px evaluates 500 images after step 3. SIGUSR2 during that evaluation: it gives way (all
    ranks agree at the next batch), the step's checkpoint is saved and the run exits with 75, in a fraction of the
    time the whole evaluation takes (measured by the resumed run, which evaluates the step again, completely; an
    evaluation that did not give way would take all of it, plus the save)."""
    run_dir = tmp_path / "run"
    cmd = launch_cmd(
        run_dir, f"data.train_url={fmnist_shards}", f"data.val_url={fmnist_test_shards}",
        "data.image_size=224", "data.batch_size=8", "schedule.max_steps=3", "eval.every_steps=3",
        "model.num_classes=10", "model.pretrained=null", "data.num_workers=1", ranks=2, config="demo_finetune",
    )  # fmt: skip
    log = tmp_path / "first.log"
    proc = start(cmd, log)
    wait_for(lambda: _first_line(log, r"step 3: evaluating") is not None, what="the evaluation", proc=proc)
    signalled = time.monotonic()
    assert preempt(proc) == REQUEUE_EXIT_CODE
    stopped_in = time.monotonic() - signalled
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == "step_00000003"
    assert _first_line(log, r"evaluation at step 3 stopped after \d+ of \d+ batches: preemption") is not None
    assert run(cmd) == 0  # the resumed run evaluates step 3 completely
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (full,) = [r for r in evals if r["kind"] == "eval" and r["step"] == 3]
    assert full["val_images"] == 500
    assert stopped_in < full["eval_s"] / 2 + 3.0, (stopped_in, full["eval_s"])  # 3 s: the save and the exit
    print(f"stopped in {stopped_in:.1f} s; the whole evaluation takes {full['eval_s']:.1f} s")


@pytest.mark.slow
def test_checkpoints_upload_in_the_background_and_resume_from_the_mirror(
    tmp_path: Path, s3_bucket: str, fmnist_shards: str
) -> None:
    import fsspec

    mirror = f"{s3_bucket}/runs/bg"
    run_dir = tmp_path / "run"
    common = (
        f"data.train_url={fmnist_shards}", "data.batch_size=8", "checkpoint.every_steps=3", "checkpoint.keep=4",
        f"checkpoint.mirror_url={mirror}",
    )  # fmt: skip
    log = tmp_path / "first.log"
    proc = start(launch_cmd(run_dir, *common, "schedule.max_steps=9", ranks=2), log)
    assert proc.wait(timeout=300) == 0
    text = log.read_text()
    uploads = {m[0]: float(m[1]) for m in re.findall(r"checkpoint (step_\d+) mirrored to \S+ in ([\d.]+)s", text)}
    local = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert sorted(uploads) == local == ["step_00000003", "step_00000006", "step_00000009"]
    fs = fsspec.filesystem("s3")
    for tag in local:  # every complete checkpoint, marker included, file for file
        remote = {p.split(f"{tag}/", 1)[1] for p in fs.find(f"{mirror}/{tag}")}
        assert remote == {p.relative_to(run_dir / "checkpoints" / tag).as_posix()
                          for p in (run_dir / "checkpoints" / tag).rglob("*") if p.is_file()}  # fmt: skip
    # Training went on while each upload ran: the next step finished before its checkpoint reached the mirror
    # (with an upload inside the step, the "mirrored" line would always come first).
    lines = text.splitlines()
    for tag in ("step_00000003", "step_00000006"):
        mirrored = next(i for i, line in enumerate(lines) if f"checkpoint {tag} mirrored" in line)
        next_step = next(i for i, line in enumerate(lines) if re.search(rf"step +{int(tag[5:]) + 1}/9 \|", line))
        assert next_step < mirrored, (tag, lines[next_step], lines[mirrored])
    # A preemption whose warning window leaves no time for the upload: reported as incomplete, and the mirror keeps
    # its newest complete checkpoint.
    log2 = tmp_path / "second.log"
    proc = start(launch_cmd(run_dir, *common, "schedule.max_steps=30", "cluster.signal_delay_s=10", ranks=2), log2)
    wait_for(lambda: len(logged_steps(run_dir)) >= 11, what="step 11", proc=proc)
    assert preempt(proc) == REQUEUE_EXIT_CODE
    text = log2.read_text()
    stopped = (run_dir / "checkpoints" / LATEST).read_text().strip()
    assert re.search(rf"mirror upload of {stopped} to \S+ did not finish in 0s", text), text[-3000:]
    newest = sorted([*re.findall(r"checkpoint (step_\d+) mirrored", text), "step_00000009"])[-1]
    assert newest < stopped
    # The node's disk is lost: the run resumes from the mirror's newest complete checkpoint.
    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    log3 = tmp_path / "third.log"
    proc = start(launch_cmd(run_dir, *common, "schedule.max_steps=30", ranks=2), log3)
    assert proc.wait(timeout=300) == 0
    assert f"resuming from the mirror: fetched {newest}" in log3.read_text()


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_refused_and_the_previous_one_used(
    tmp_path: Path, s3_bucket: str, fmnist_shards: str
) -> None:
    import fsspec

    mirror = f"{s3_bucket}/runs/damaged"
    common = (
        f"data.train_url={fmnist_shards}", "data.batch_size=8", "checkpoint.every_steps=2", "checkpoint.keep=3",
        f"checkpoint.mirror_url={mirror}",
    )  # fmt: skip
    base = tmp_path / "base"
    assert run(launch_cmd(base, *common, "schedule.max_steps=6", ranks=2)) == 0
    marker = json.loads((base / "checkpoints" / "step_00000006" / MARKER).read_text())
    biggest = max(marker["files"], key=lambda name: marker["files"][name]["bytes"])

    def resumed_from(run_dir: Path, label: str, *extra: str) -> tuple[int, str]:
        log = tmp_path / f"{label}.log"
        proc = start(launch_cmd(run_dir, *common, "schedule.max_steps=8", *extra, ranks=2), log)
        assert proc.wait(timeout=300) == 0
        text = log.read_text()
        return int(re.findall(r"resumed from \S+ at step (\d+)", text)[0]), text

    import shutil

    cases = {}
    for label in ("intact", "truncated", "changed"):
        run_dir = tmp_path / label
        shutil.copytree(base, run_dir)
        path = run_dir / "checkpoints" / "step_00000006" / biggest
        data = path.read_bytes()
        if label == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif label == "changed":  # the same size, one byte flipped in the middle
            path.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :])
        cases[label] = resumed_from(run_dir, label, "checkpoint.mirror_url=null")  # the mirror stays as it was
    assert cases["intact"][0] == 6  # the control: an undamaged checkpoint is used
    for label in ("truncated", "changed"):
        step, text = cases[label]
        assert step == 4, label
        assert re.search(rf"checkpoint step_00000006 is damaged \({re.escape(biggest)} ", text), label
        assert (tmp_path / label / "checkpoints" / "damaged_step_00000006").is_dir()  # kept for inspection

    # On the mirror: the local checkpoints are gone and the mirror's newest copy has changed bytes.
    fs = fsspec.filesystem("s3")
    remote = f"{mirror}/step_00000006/{biggest}"
    data = fs.cat_file(remote)
    fs.pipe_file(remote, data[:-1] + bytes([data[-1] ^ 0xFF]))
    run_dir = tmp_path / "from_mirror"
    shutil.copytree(base, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    step, text = resumed_from(run_dir, "mirror")
    assert step == 4 and "mirror copy of step_00000006 is damaged" in text
