"""The fault matrix: every fault at every phase of a run, each met while the run recovers from the one before,
checked against the run's guarantees as a whole (SPEC section 10).

A run here is the command a user types, relaunched after each fault until it ends. Faults are reached
deterministically through :mod:`trainer.resilience.faults` (``FCMAE_FAULT``), and the damaged checkpoints between
segments are made by the test. After the last segment: the final weights (and the sample ledger) equal the uninterrupted
run's bit for bit, or, after a rollback, the ledger and ``rollbacks.jsonl`` account for every sample; no process of
the run is left; nothing on disk blocks a resume (no lock, partial directory or half-written file); every segment
that did not finish exited non-zero with a summary line naming its cause. Each equivalence carries a negative
control that the same assertion rejects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support.launch import env, launch_cmd, run_processes, start, wait_for
from tests.support.spikes import SHARD, calm, noise, seed_hitting_noise_once, write_shard
from tests.support.weights import copy_with_loader_ahead, exported_weights
from trainer.resilience.checkpoint import LATEST, MARKER
from trainer.resilience.faults import BALLAST
from trainer.resilience.ledger import read_ledger
from trainer.resilience.preemption import REQUEUE_EXIT_CODE
from trainer.run_dir import RunDir

KILLED = -9  # the launcher's exit status after SIGKILL


class Segments:
    """Relaunches of one run directory's command, each with its own fault, logged to its own file."""

    def __init__(self, tmp: Path, cmd: list[str]) -> None:
        self.tmp, self.cmd, self.count = tmp, cmd, 0
        self.logs: list[Path] = []

    def run(self, fault: str | None, expect: int, cmd: list[str] | None = None) -> str:
        """One segment: the command with ``fault``; asserts its exit code and that no process of it is left
        within the watchdog's bound; returns its log."""
        self.count += 1
        log = self.tmp / f"segment-{self.count:02d}.log"
        self.logs.append(log)
        proc = start(cmd or self.cmd, log, fault)
        code = proc.wait(timeout=300)
        run_dir = Path((cmd or self.cmd)[(cmd or self.cmd).index("--run-dir") + 1])
        # A SIGKILLed launcher cannot wait for its ranks: they stop by themselves (parent-death signal).
        wait_for(lambda: not run_processes(run_dir), timeout=60, what="the run's processes to end")
        text = log.read_text()
        assert code == expect, f"segment {self.count} ({fault}) exited {code}, expected {expect}\n{text[-4000:]}"
        return text


def _flip_a_byte(checkpoint: Path) -> str:
    """Change one byte in the middle of the checkpoint's largest file (its size stays); returns the file."""
    marker = json.loads((checkpoint / MARKER).read_text())
    name = max(marker["files"], key=lambda n: marker["files"][n]["bytes"])
    data = bytearray((checkpoint / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (checkpoint / name).write_bytes(bytes(data))
    return name


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = exported_weights(a), exported_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _evaluations(run_dir: Path) -> dict[int, dict[str, float]]:
    """Step -> the probes' values of the last evaluation of that step in ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = ("knn_top1", "effective_rank", "feature_cosine_distance_s1", "feature_cosine_distance_s4")
    return {r["step"]: {k: r[k] for k in keys} for r in records if r["kind"] == "eval"}


def _summary_of_the_training(run_dir: Path) -> dict[str, object]:
    """``metrics.json`` less what differs between segmented and whole runs (time, restarts, world per segment)."""
    summary = json.loads((run_dir / "export" / "metrics.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("train_time_s", "restarts", "world_sizes")}


def _nothing_blocks_a_resume(run_dir: Path) -> None:
    """No lock, no half-written file, no checkpoint directory without its marker."""
    assert not RunDir(run_dir).lock.exists()
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.startswith(".fetch_")]
    assert leftovers == [], leftovers
    partial = [d.name for d in (run_dir / "checkpoints").glob("step_*") if not (d / MARKER).exists()]
    assert partial == [], partial


def _summary(text: str, pattern: str) -> None:
    assert re.search(pattern, text), f"no summary line matching {pattern!r} in\n{text[-3000:]}"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 640 MB tmpfs mounted for the test (as root): a disk that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_faults_at_every_phase_of_one_run_end_with_the_uninterrupted_weights(
    tmp_path: Path, tmpfs: Path, fmnist_shards: str, fmnist_test_shards: str, s3_bucket: str
) -> None:
    """Eleven segments of one 2-rank run on a tmpfs, with the kNN probe, a mirror on S3 and the sample ledger; each
    segment faults the recovery from the one before. Cells: train step x SIGKILL rank 1 (with a second launch
    refused), save x SIGKILL launcher, train step x SIGHUP, damaged checkpoint + train step x SIGKILL rank 0, the
    same step damaged again + evaluation x SIGTERM, mirror upload x SIGKILL rank 0, marker x SIGINT, save x ENOSPC,
    export x ENOSPC, export x SIGKILL rank 0, then the end, whose summary (losses, probes) is the uninterrupted
    run's."""
    common = (
        f"data.train_url={fmnist_shards}", f"data.val_url={fmnist_test_shards}", f"eval.knn_bank_url={fmnist_shards}",
        "data.batch_size=8", "schedule.max_steps=12", "checkpoint.every_steps=2", "checkpoint.keep=3",
        "eval.every_steps=6", "tracking.sample_ledger=true", "watchdog.min_timeout_s=60",
    )  # fmt: skip
    reference = tmp_path / "reference"
    assert start(launch_cmd(reference, *common, ranks=2), tmp_path / "reference.log").wait(timeout=300) == 0
    run_dir = tmpfs / "run"
    cmd = launch_cmd(run_dir, *common, f"checkpoint.mirror_url={s3_bucket}/matrix", ranks=2)
    seg = Segments(tmp_path, cmd)
    ckpt = run_dir / "checkpoints"

    # 1. A train step x SIGKILL of rank 1, before anything was saved; meanwhile a second launch on the same
    #    directory is refused at once, naming the holder.
    log = tmp_path / "segment-01.log"
    first = start(cmd, log, "step@1=kill_rank@1")
    wait_for(lambda: RunDir(run_dir).lock.exists(), what="the run lock", proc=first)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert second.returncode == 2, second.stderr[-2000:]
    assert re.search(rf"{run_dir} is in use by another run: launcher pid {first.pid} on ", second.stderr)
    assert first.wait(timeout=300) == 128 + 9
    seg.count, seg.logs = 1, [log]
    wait_for(lambda: not run_processes(run_dir), timeout=60, what="the ranks to end")
    _summary(log.read_text(), r"run failed: rank 1 was killed by SIGKILL")
    assert not ckpt.exists() or not list(ckpt.glob("step_*"))

    # 2. A save x SIGKILL of the launcher: the ranks get SIGTERM from the kernel, finish the save, train the next
    #    step (the save came after that step's poll) and stop with its checkpoint.
    text = seg.run("save@2=kill_launcher", KILLED)
    _summary(text, r"received SIGTERM \(the launcher, pid \d+, died\): saving a checkpoint")
    assert (ckpt / LATEST).read_text() == "step_00000003"
    # 3. The lock of the dead launcher is taken over; a train step x SIGHUP: saved at that step, exit 128 + 1.
    text = seg.run("step@4=hup_launcher", 129)
    assert "taking over the lock of launcher pid" in text
    _summary(text, r"run stopped by SIGHUP \(newest checkpoint step_00000004\); re-run the same command")
    # 4. The newest checkpoint is damaged; the resume sets it aside and uses step 3; rank 0 SIGKILLed at step 5.
    _flip_a_byte(ckpt / "step_00000004")
    text = seg.run("step@5=kill_rank@0", 128 + 9)
    assert "checkpoint step_00000004 is damaged" in text and "resumed from" in text
    _summary(text, r"run failed: rank 0 was killed by SIGKILL")
    # 5. Step 4 (saved again) is damaged again: kept as damaged_step_00000004.2; then SIGTERM in the evaluation.
    _flip_a_byte(ckpt / "step_00000004")
    text = seg.run("evaluation@6=term_launcher", 143)
    assert {d.name for d in ckpt.glob("damaged_*")} == {"damaged_step_00000004", "damaged_step_00000004.2"}
    _summary(text, r"evaluation at step 6 stopped after \d+ of \d+ batches: preemption")
    _summary(text, r"run stopped by SIGTERM \(newest checkpoint step_00000006\)")
    # 6. The evaluation is redone; rank 0 SIGKILLed while step 8 uploads to the mirror (a kill, not a signal the
    #    loop sees at some later step: the upload runs beside training, so only a kill ends the segment at a known
    #    checkpoint). The mirror's copy has no marker; step 8 is the newest local checkpoint.
    text = seg.run("mirror=kill_rank@0", 128 + 9)
    assert re.search(r"eval step 6 .*knn_top1", text), "the stopped evaluation was not redone"
    _summary(text, r"run failed: rank 0 was killed by SIGKILL")
    assert (ckpt / LATEST).read_text() == "step_00000008"
    # 7. SIGINT (Ctrl-C) just after a checkpoint's marker is written.
    text = seg.run("marker@10=int_launcher", 130)
    _summary(text, r"run stopped by SIGINT \(newest checkpoint step_00000011\)")
    saved_before_full = (ckpt / LATEST).read_text()
    # 8. The disk fills during the save of step 12: the partial save is deleted, the run fails saying what it needs.
    text = seg.run("save@12=fill_disk", 1)
    _summary(text, rf"run failed: rank \d exited with code 1: DiskFullError: no space left on the device of {ckpt} "
                   r"while saving step_00000012: a checkpoint takes \d+ MB")  # fmt: skip
    assert (ckpt / LATEST).read_text() == saved_before_full and not (ckpt / "step_00000012").exists()
    (tmpfs / BALLAST).unlink()  # the operator frees space
    # (The negative control: this state, resumed with the loader one batch ahead, must end with other weights.)
    copy_with_loader_ahead(run_dir, tmp_path / "control")
    # 9. The disk fills during the export (weights written, metrics.json not): the same, for the export.
    text = seg.run("export=fill_disk", 1)
    _summary(text, rf"DiskFullError: no space left on the device of {run_dir / 'export'} while exporting")
    assert not (run_dir / "export" / "metrics.json").exists()
    (tmpfs / BALLAST).unlink()
    # 10. The export x SIGKILL of rank 0 (weights written, metrics.json not).
    text = seg.run("export=kill_rank@0", 128 + 9)
    _summary(text, r"run failed: rank 0 was killed by SIGKILL")
    assert not (run_dir / "export" / "metrics.json").exists()
    # 11. The same command ends the run.
    seg.run(None, 0)

    assert _same_weights(run_dir, reference)
    # Every evaluation the config asks for ran (the one a signal stopped was redone), on the same images.
    assert _evaluations(run_dir) == _evaluations(reference) and set(_evaluations(reference)) == {6, 12}
    ledger, expected = read_ledger(run_dir / "ledger"), read_ledger(reference / "ledger")
    assert list(ledger) == list(range(1, 13)) and ledger == expected  # every step once, the same samples
    # The export resumed at the last step trains nothing and reports the saved run: its loss and evaluation.
    assert _summary_of_the_training(run_dir) == _summary_of_the_training(reference)
    assert {"final_loss", "first_loss", "knn_top1", "effective_rank"} <= set(_summary_of_the_training(reference))
    summary = json.loads((run_dir / "export" / "metrics.json").read_text())
    assert summary["restarts"] == 10 == len(RunDir(run_dir).segments.read_text().splitlines()) - 1
    _nothing_blocks_a_resume(run_dir)
    control = subprocess.run(launch_cmd(tmp_path / "control", *common, ranks=2), capture_output=True, timeout=300)
    assert control.returncode == 0
    assert not _same_weights(tmp_path / "control", reference)  # the same assertion rejects a wrong resume
    assert _summary_of_the_training(tmp_path / "control") != _summary_of_the_training(reference)


def _mlflow_view(run_dir: Path) -> dict[str, object]:
    """What MLflow shows of a run (its run directory's store), ids left out: status, parameters, the first start's
    records, the description's result, the exported model and its registered versions, the baseline runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    model_id = run.data.tags.get("logged_model_id")
    model = client.get_logged_model(model_id) if model_id else None
    versions = client.search_model_versions("name = 'matrix-model'")
    children = client.search_runs([run.info.experiment_id], f"tags.baseline_of = '{run.info.run_id}'")
    return {
        "status": run.info.status,
        "params": run.data.params,
        "first start logged": run.data.tags.get("first_start_logged"),
        "config": [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "config.yaml"],
        "inputs": sorted(d.dataset.name for d in run.inputs.dataset_inputs),
        "result": run.data.tags.get("mlflow.note.content", "").split("\n\n")[-1],
        "model": None if model is None else (str(model.status), model.name),
        "model id file": model_id is not None and (run_dir / "export" / "mlflow_model_id").read_text() == model_id,
        "versions": sorted((int(v.version), v.source == (model and model.artifact_location)) for v in versions),
        "baseline runs": sorted((c.info.run_name, c.info.status) for c in children),
    }


@pytest.mark.slow
def test_kills_while_a_run_reaches_mlflow_or_replaces_its_export_leave_the_uninterrupted_record(
    tmp_path: Path, fmnist_shards: str, fmnist_test_shards: str
) -> None:
    """One rank, the kNN probe (with its random-init baseline run) and a registered model. SIGKILL after the MLflow
    run is created, before its parameters, config and inputs; then after the export's files are uploaded as a logged
    model, before it is finalized and registered (metrics.json written); the relaunch finds the run complete and
    publishes the export. MLflow then shows what the uninterrupted run's store shows; the killed state, checked the
    same way, does not (the control). Then the schedule is extended and rank 0 SIGKILLed inside the new export:
    the old metrics.json must not pass for the new export's."""
    common = (
        f"data.train_url={fmnist_shards}", f"data.val_url={fmnist_test_shards}", f"eval.knn_bank_url={fmnist_shards}",
        "data.batch_size=8", "schedule.max_steps=4", "checkpoint.every_steps=2", "eval.every_steps=2",
        "tracking.register_as=matrix-model",
    )  # fmt: skip
    reference = tmp_path / "reference"
    assert start(launch_cmd(reference, *common), tmp_path / "reference.log").wait(timeout=300) == 0
    expected = _mlflow_view(reference)
    assert expected["status"] == "FINISHED" and expected["model"] == ("READY", "demo_fcmae")
    assert expected["versions"] == [(1, True)] and expected["baseline runs"] == [
        ("demo_fcmae / random init", "FINISHED")]  # fmt: skip
    assert expected["config"] == ["config.yaml"] and expected["first start logged"] == "true"

    run_dir = tmp_path / "run"
    seg = Segments(tmp_path, launch_cmd(run_dir, *common))
    _summary(seg.run("tracking=kill_rank@0", 128 + 9), r"run failed: rank 0 was killed by SIGKILL")
    assert _mlflow_view(run_dir)["params"] == {}
    _summary(seg.run("publish=kill_rank@0", 128 + 9), r"run failed: rank 0 was killed by SIGKILL")
    assert (run_dir / "export" / "metrics.json").exists()
    killed = _mlflow_view(run_dir)
    assert killed != expected  # the control: the same comparison rejects the state the kill left
    assert "run already complete" in seg.run(None, 0)
    assert _mlflow_view(run_dir) == expected

    # A longer schedule replaces the export; a kill between its weights and its metrics.json leaves no metrics.json
    # (the old one would describe the old weights), and the relaunch completes and publishes the new export.
    longer = launch_cmd(run_dir, *common, "schedule.max_steps=6")
    seg.run("export=kill_rank@0", 128 + 9, cmd=longer)
    assert not (run_dir / "export" / "metrics.json").exists()
    seg.run(None, 0, cmd=longer)
    assert json.loads((run_dir / "export" / "metrics.json").read_text())["steps"] == 6
    view = _mlflow_view(run_dir)
    assert view["versions"] == [(1, False), (2, True)] and view["model id file"] and "step 6" in str(view["result"])


def _rollbacks_in_mlflow(run_dir: Path) -> list[tuple[int, float]]:
    """The ``train/rollbacks`` points of the run's MLflow run: (step, count)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "train/rollbacks")]


def _spike_data(tmp_path: Path) -> tuple[tuple[str, ...], int, list[str]]:
    """20 shards of 8 calm images with one of noise, a seed that serves the noise at step 7 or 8, and the step the
    spike is found at (8, the end of the log interval 7-8)."""
    clean, bad = tmp_path / "calm", tmp_path / "noise"
    clean.mkdir()
    bad.mkdir()
    for shard in range(19):
        write_shard(clean / f"calm-{shard:03d}.tar", f"calm{shard:02d}_", [calm(shard * SHARD + i) for i in range(8)])
    noise_keys = write_shard(bad / "noise-000.tar", "noise", [noise(i) for i in range(SHARD)])
    # Log intervals of 2 steps and a checkpoint every step: the interval that spikes spans a save, so the rollback
    # abandons a checkpoint (the spike is found at the interval's end, the restored step precedes its start).
    seed, _ = seed_hitting_noise_once(20, bad=19, first_step=7, last_step=8)
    common = (
        f"seed={seed}", f"data.train_url=[{clean}, {bad}]", "data.batch_size=8", "data.shuffle_window=8",
        "schedule.max_steps=10", "model.norm_pix_loss=false", "checkpoint.every_steps=1", "checkpoint.keep=5",
        "schedule.spike_factor=3", "schedule.spike_window=3", "tracking.sample_ledger=true", "tracking.log_every=2",
    )  # fmt: skip
    return common, 8, noise_keys


@pytest.mark.slow
def test_a_crash_during_a_rollback_neither_replays_the_spike_nor_spends_another_rollback(tmp_path: Path) -> None:
    """The noise shard spikes the loss at step 7 or 8; the run, preempted at step 7 and resumed, rolls back to
    step 6 at step 8. Rank 0 SIGKILLed right after the rollback is recorded
    (before ``latest`` moves and the newer checkpoints go, and before MLflow is told), then SIGUSR2 in the resumed
    run's first step: the run ends with the uninterrupted rollback run's weights, ledger and MLflow rollback
    metric, one rollback in the record, and the ledger
    holds every sample of the epoch once except exactly the ones the record names. Control: the same crash
    resumed from the checkpoints the rollback abandoned (as before the commit existed) replays the spike and spends
    a second rollback on it. And a run whose rollback budget is spent fails, saying so."""
    common, noisy_step, noise_keys = _spike_data(tmp_path)
    reference = tmp_path / "reference"
    assert start(launch_cmd(reference, *common, ranks=2), tmp_path / "reference.log").wait(timeout=300) == 0
    (record,) = [json.loads(line) for line in RunDir(reference).rollbacks.read_text().splitlines()]
    assert record["detected_at_step"] == noisy_step and set(noise_keys) <= set(record["skipped_keys"])

    run_dir = tmp_path / "run"
    seg = Segments(tmp_path, launch_cmd(run_dir, *common, ranks=2))
    # Preempted the step before the spike: the rollback's record names the samples of the steps before the resume
    # too (each rank's recent keys travel in its checkpoint state).
    seg.run("step@7=preempt", REQUEUE_EXIT_CODE)
    text = seg.run("rollback=kill_rank@0", 128 + 9)
    _summary(text, r"run failed: rank 0 was killed by SIGKILL")
    newer = [d.name for d in (run_dir / "checkpoints").glob("step_*") if int(d.name[5:]) > record["restored_step"]]
    assert newer, "the crash came before the abandoned checkpoints were deleted"
    # The negative control's start: this state, with the abandoned checkpoints taken for live ones (what resuming
    # without the rollback's commit did: the pointer still names the newest).
    shutil.copytree(run_dir, tmp_path / "unabandoned")
    text = seg.run(f"step@{record['restored_step'] + 1}=preempt", REQUEUE_EXIT_CODE)
    assert f"continuing the rollback of step {noisy_step}" in text and "removed step_" in text
    seg.run(None, 0)

    def rolled_back_once_as_the_reference(run: Path) -> bool:
        records = [json.loads(line) for line in RunDir(run).rollbacks.read_text().splitlines()]
        same = len(records) == 1 and records[0]["skipped_keys"] == record["skipped_keys"]
        # MLflow shows the rollback too, though the kill came between its record and its logging.
        shown = _rollbacks_in_mlflow(run) == _rollbacks_in_mlflow(reference) == [(noisy_step, 1.0)]
        return (
            same and shown and _same_weights(run, reference) and read_ledger(run / "ledger") == read_ledger(ledger_of)
        )

    ledger_of = reference / "ledger"
    assert rolled_back_once_as_the_reference(run_dir)
    ledger = read_ledger(run_dir / "ledger")
    assert list(ledger) == list(range(1, 11))
    epoch0 = [k for entry in ledger.values() if entry["epoch"] == 0 for k in entry["keys"]]
    skipped = record["skipped_keys"]
    assert len(epoch0) == len(set(epoch0)) and not set(epoch0) & set(skipped)  # once each, none of the skipped
    assert len(set(epoch0)) + len(skipped) == 20 * SHARD  # ... and together the whole epoch
    assert len(skipped) == 16 * (record["skipped_steps"][1] - record["skipped_steps"][0] + 1)  # all ranks' samples

    # Control: the same crash resumed from the checkpoints the rollback abandoned replays the spike and spends a
    # second rollback on it: the same check rejects it.
    control = tmp_path / "unabandoned"
    for directory in (control / "checkpoints").glob("step_*"):
        marker = json.loads((directory / MARKER).read_text())
        if marker["step"] > record["restored_step"]:
            (directory / MARKER).write_text(json.dumps({**marker, "timeline": 1}))
    assert start(launch_cmd(control, *common, ranks=2), tmp_path / "control.log").wait(timeout=300) == 0
    assert len(RunDir(control).rollbacks.read_text().splitlines()) == 2
    assert not rolled_back_once_as_the_reference(control)

    # No rollback budget left: the spike fails the run, naming the setting.
    budget = tmp_path / "budget"
    text = Segments(tmp_path, launch_cmd(budget, *common, "schedule.max_rollbacks=0", ranks=2)).run(None, 1)
    _summary(text, rf"TrainingError: loss spike at step {noisy_step} .* after 0 rollbacks \(schedule.max_rollbacks=0")
    assert not (budget / "export").exists()


@pytest.mark.slow
def test_a_crash_during_a_world_size_conversion_is_redone_to_the_same_weights(tmp_path: Path) -> None:
    """2 ranks save step 4; the same run on 1 rank converts it to a universal checkpoint and is SIGKILLed after the
    conversion, before it is marked complete; the relaunch converts again (nothing half-done is reused) and ends
    with the weights of the same world-size change made without a fault. Control: that change from a copy whose
    loader is one batch ahead ends elsewhere."""
    common = ("checkpoint.every_steps=4", "checkpoint.keep=5")
    run_dir = tmp_path / "run"
    two = launch_cmd(run_dir, *common, "data.batch_size=4", "schedule.max_steps=4", ranks=2)
    assert start(two, tmp_path / "two.log").wait(timeout=300) == 0
    shutil.copytree(run_dir, tmp_path / "reference")
    copy_with_loader_ahead(run_dir, tmp_path / "control")
    one = ("data.batch_size=8", "schedule.max_steps=8")
    seg = Segments(tmp_path, launch_cmd(run_dir, *common, *one, ranks=1))
    text = seg.run("conversion=kill_rank@0", 128 + 9)
    _summary(text, r"run failed: rank 0 was killed by SIGKILL")
    assert not (run_dir / "checkpoints" / "step_00000004_universal").exists()
    text = seg.run(None, 0)
    assert "converting it to a universal checkpoint" in text
    for other in ("reference", "control"):
        cmd = launch_cmd(tmp_path / other, *common, *one, ranks=1)
        assert start(cmd, tmp_path / f"{other}.log").wait(timeout=300) == 0
    assert _same_weights(run_dir, tmp_path / "reference")
    assert not _same_weights(tmp_path / "control", tmp_path / "reference")
    _nothing_blocks_a_resume(run_dir)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
