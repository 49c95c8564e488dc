"""Checkpoints, devices and argument checks shared by the lessons."""
import argparse
import math
import os
import pickle

import pytest
import torch

from utils import runtime


def checkpoint(lesson="01_ddpm_toy", **extra):
    return {"format": runtime.CHECKPOINT_FORMAT, "lesson": lesson, "model": {"w": torch.ones(3)}, **extra}


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pt"
    runtime.save_checkpoint(checkpoint(step=7), path)
    loaded = runtime.load_checkpoint(path, "01_ddpm_toy")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


def test_a_failing_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    runtime.save_checkpoint(checkpoint(step=1), path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(runtime.LessonError) as failed:  # one line that names the file and keeps the cause
        runtime.save_checkpoint(checkpoint(step=2, bad=Unsaveable()), path)
    assert str(failed.value).startswith(f"could not write {path}: disk full") and "\n" not in str(failed.value)
    assert runtime.load_checkpoint(path, "01_ddpm_toy")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


KILLED_WRITER = """
import sys, torch
from utils.runtime import CHECKPOINT_FORMAT, save_checkpoint
step = 0
while True:  # ever larger saves of 32 MB: the parent kills this process in the middle of one
    step += 1
    save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": "01_ddpm_toy", "step": step,
                     "model": {"w": torch.full((8_000_000,), float(step))}}, sys.argv[1])
    print(step, flush=True)
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    path = tmp_path / "checkpoint.pt"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    completed = int(writer.stdout.readline())  # one save has finished
    deadline = time.time() + 60
    while not list(tmp_path.glob(".checkpoint.pt.*.tmp")) and time.time() < deadline:
        time.sleep(0.001)  # wait until the next save is writing its temporary file...
    writer.send_signal(signal.SIGKILL)  # ...and kill it there, with no chance to clean up
    writer.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert leftovers and all(name.startswith(".checkpoint.pt.") and name.endswith(".tmp") for name in leftovers)
    loaded = runtime.load_checkpoint(path, "01_ddpm_toy")  # the path holds a whole checkpoint, never a part
    assert loaded["step"] >= completed
    assert torch.equal(loaded["model"]["w"], torch.full((8_000_000,), float(loaded["step"])))
    runtime.save_checkpoint(checkpoint(step=99), path)  # the next save clears what the killed one left
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_checkpoint_of_another_lesson_is_refused_naming_both(tmp_path):
    path = tmp_path / "checkpoint.pt"
    runtime.save_checkpoint(checkpoint("02_ddpm"), path)
    with pytest.raises(runtime.LessonError, match=f"{path} is a checkpoint of lesson 02_ddpm, not of 01_ddpm_toy"):
        runtime.load_checkpoint(path, "01_ddpm_toy")


def test_truncated_checkpoint_gives_one_line_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    runtime.save_checkpoint(checkpoint(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(runtime.LessonError) as error:
        runtime.load_checkpoint(path, "01_ddpm_toy")
    assert str(error.value).startswith(f"{path} is not a readable checkpoint") and "\n" not in str(error.value)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "lesson": "01_ddpm_toy", "payload": RunsCode()}, path, pickle_module=pickle)
    with pytest.raises(runtime.LessonError, match="not a readable checkpoint"):
        runtime.load_checkpoint(path, "01_ddpm_toy")
    assert not (tmp_path / "pwned").exists()


def test_require_same_names_the_difference(tmp_path):
    runtime.require_same({"width": 8}, {"width": 8}, ["width"], "ckpt")
    with pytest.raises(runtime.LessonError, match="ckpt was trained with width=8, this run has width=16"):
        runtime.require_same({"width": 8}, {"width": 16}, ["width"], "ckpt")


@pytest.mark.parametrize("text,ok", [("1", True), ("12", True), ("0", False), ("-1", False), ("1.5", False)])
def test_positive_int(text, ok):
    if ok:
        assert runtime.positive_int(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            runtime.positive_int(text)


@pytest.mark.parametrize("text,ok", [("1e-3", True), ("0", False), ("-2", False), ("inf", False), ("nan", False)])
def test_positive_float(text, ok):
    if ok:
        assert runtime.positive_float(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            runtime.positive_float(text)


def test_writable_dir_accepts_new_folders_and_refuses_files(tmp_path):
    assert runtime.writable_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        runtime.writable_dir(str(tmp_path / "file" / "out"))


def test_auto_device_on_this_machine_and_unavailable_devices_refused():
    device = runtime.pick_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(runtime.LessonError, match="no CUDA GPU"):
            runtime.pick_device("cuda")


def test_stop_request_catches_the_first_signal_and_restores_handlers():
    import signal
    before = signal.getsignal(signal.SIGINT)
    with runtime.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_metrics_log_appends_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    log = runtime.MetricsLog(path, append=False)
    log.write(1, 0.5, 1e-3, 100.0)
    log.close()
    log = runtime.MetricsLog(path, append=True)
    log.write(2, 0.4, 1e-3, 100.0)
    log.close()
    assert path.read_text().splitlines() == ["step,loss,lr,images_per_s", "1,0.500000,1.000e-03,100.0",
                                             "2,0.400000,1.000e-03,100.0"]


def test_in_batches_covers_every_item_once_and_keeps_the_first_batchs_extra():
    from utils.runtime import in_batches
    calls = []

    def draw(start, count):
        calls.append((start, count))
        return torch.arange(start, start + count).view(count, 1), f"extra of {start}"

    images, extra = in_batches(10, 4, draw)
    assert calls == [(0, 4), (4, 4), (8, 2)]
    assert images.flatten().tolist() == list(range(10)) and extra == "extra of 0"
    assert in_batches(3, 64, draw)[0].flatten().tolist() == [0, 1, 2]


def test_warmup_learning_rate_rises_linearly_then_stays():
    assert runtime.warmup_learning_rate(0, 1e-3, 100) == pytest.approx(1e-5)
    assert runtime.warmup_learning_rate(49, 1e-3, 100) == pytest.approx(5e-4)
    assert runtime.warmup_learning_rate(99, 1e-3, 100) == pytest.approx(1e-3)
    assert runtime.warmup_learning_rate(10**5, 1e-3, 100) == 1e-3
    assert runtime.warmup_learning_rate(0, 1e-3, 0) == 1e-3


def test_epoch_order_is_a_fresh_shuffle_per_epoch_and_the_same_after_a_resume():
    """Each epoch's batches are distinct images of one permutation seeded by seed + epoch; a new EpochOrder asked
    for a step in the middle (a resumed run) gives the batch an uninterrupted one gives there."""
    order = runtime.EpochOrder(count=10, batch_size=3, steps_per_epoch=3, seed=5)
    batches = [order.batch(step) for step in range(9)]
    for epoch in range(3):
        seen = torch.cat(batches[3 * epoch:3 * epoch + 3])
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch))[:9]
        assert torch.equal(seen, expected) and len(set(seen.tolist())) == 9
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:6]))
    assert torch.equal(runtime.EpochOrder(10, 3, 3, seed=5).batch(7), batches[7])
    custom = runtime.EpochOrder(4, 2, 2, seed=0, shuffle=lambda epoch: torch.arange(4).flip(0) + 10 * epoch)
    assert custom.batch(0).tolist() == [3, 2] and custom.batch(3).tolist() == [11, 10]


def test_training_log_writes_the_mean_loss_of_each_window(tmp_path, capsys):
    log = runtime.TrainingLog(tmp_path / "metrics.csv", total_steps=5, start_step=0, images_per_step=8, every=2,
                              append=False)
    for step, loss in zip(range(1, 6), [1.0, 3.0, 5.0, 7.0, 9.0]):
        log.add(step, loss, lr=0.1)
    log.close()
    rows = [line.split(",") for line in (tmp_path / "metrics.csv").read_text().splitlines()]
    assert rows[0] == ["step", "loss", "lr", "images_per_s"]
    assert [(int(r[0]), float(r[1])) for r in rows[1:]] == [(2, 2.0), (4, 6.0), (5, 9.0)]
    assert all(float(r[3]) > 0 for r in rows[1:])
    printed = capsys.readouterr().out
    assert "trained in" in printed and "(5 steps)" in printed
    quiet = runtime.TrainingLog(tmp_path / "other.csv", 5, 0, 8, 2, append=False, enabled=False)
    quiet.add(2, 1.0, 0.1)
    quiet.close()
    assert not (tmp_path / "other.csv").exists() and capsys.readouterr().out == ""


def test_checkpoint_cadence_and_the_loop_errors(tmp_path):
    due = [step for step in range(1, 12) if runtime.checkpoint_due(step, 11, 4, stopping=False)]
    assert due == [4, 8, 11] and runtime.checkpoint_due(5, 11, 4, stopping=True)
    runtime.check_finite(0.5, 3, tmp_path / "checkpoint.pt")
    with pytest.raises(runtime.LessonError, match="the loss became nan at step 3; .*lower learning rate"):
        runtime.check_finite(float("nan"), 3, tmp_path / "checkpoint.pt")
    error = runtime.stopped_early(3, 10, tmp_path / "checkpoint.pt")
    assert isinstance(error, runtime.Interrupted) and error.exit_code == 130 and "--resume" in str(error)
    assert runtime.mean_over_processes([1.0, 0.0], 1, "cpu") == [1.0, 0.0]


@pytest.mark.parametrize("lesson", ["02_ddpm.py", "03_conditional_ddpm.py", "05_latent_diffusion.py"])
@pytest.mark.parametrize("decay", [0.999, 0.9995, 0.9999, 0.99, 0.9, 0.5, 0.0])
def test_ema_decay_note_names_the_first_step_each_lessons_warmup_reaches_the_decay(lesson, decay):
    """Lessons 02, 03 and 05 average with their EMA.decay_at(n) = min(decay, (1 + n) / (10 + n)) at step n:
    --ema-decay takes effect from the first n where the warm-up reaches it (8990 for 0.999, found here by brute
    force over the lesson's own decay_at); a run that ends before that gets a note naming that step and the run's
    length, a longer run none."""
    from conftest import load_lesson

    ema = load_lesson(lesson).EMA(torch.nn.Linear(2, 2), decay)
    first = next(n for n in range(10 ** 6) if ema.decay_at(n) >= decay)
    assert ema.decay_at(first) == decay  # from there on the chosen decay itself
    assert runtime.ema_decay_note(ema, first + 1) is None  # its last step, n = first, uses the chosen decay
    if first == 0:  # decay 0: every step uses it
        return
    note = runtime.ema_decay_note(ema, first)  # the last step is n = first - 1: the warm-up throughout
    steps = f"these {first} steps" if first > 1 else "this 1 step"
    assert note.startswith(f"note: --ema-decay {decay} takes effect only from step {first}; in {steps} the EMA's")
    last = first / (10 + first - 1)  # the warm-up's decay at the last step, n = first - 1, from the formula
    assert f"up to {math.floor(last * 10 ** 4) / 10 ** 4:.4f} at the last step" in note  # rounded down, below decay
    if decay == 0.999:
        assert first == 8990 and note.endswith("(up to 0.9989 at the last step)")  # 0.998999, not "0.9990"
        assert runtime.ema_decay_note(ema, 2340).endswith("(up to 0.9961 at the last step)")


def test_ema_decay_note_follows_the_warmup_it_is_given():
    """The note reads the EMA's own decay_at, so another warm-up gives another first step: 1 - 1/(n + 2) reaches
    0.977 at n = 42 (0.97674 at 41); a warm-up that never reaches its decay is a ValueError, not an endless search."""

    class SlowWarmup:
        decay = 0.977

        def decay_at(self, step):
            return min(self.decay, 1 - 1 / (step + 2))

    assert runtime.ema_decay_note(SlowWarmup(), 43) is None
    assert "takes effect only from step 42; in these 42 steps" in runtime.ema_decay_note(SlowWarmup(), 42)

    class Stuck(SlowWarmup):
        def decay_at(self, step):
            return 0.5

    with pytest.raises(ValueError, match="never reaches its decay 0.977"):
        runtime.ema_decay_note(Stuck(), 10)


def test_a_run_that_fails_before_saving_a_checkpoint_removes_the_outputs_it_made_and_puts_back_the_earlier(tmp_path):
    """Issue 38, kind 3: a fresh run that fails before its first checkpoint (lesson 01 draws forward.png, then the
    loss is nan at step 1) takes back the files it wrote where none was, its metrics.csv and the folder it made,
    and puts back, byte for byte, each earlier file it wrote over (even twice); an earlier file it did not touch
    stays. Once a checkpoint is saved, what it wrote is kept (Ctrl-C while sampling keeps the trained run's
    pictures). No hidden copy is left behind in any case."""
    def failing(out, save, fail=True):
        def main():
            runtime.make_out_dir(out)
            log = runtime.MetricsLog(out / "metrics.csv", append=False)
            log.write(1, 0.5, 1e-3, 10.0)
            with runtime.atomic_output(out / "forward.png") as temporary:
                temporary.write_bytes(b"new")
            for text in (b"replaced", b"replaced again"):
                with runtime.atomic_output(out / "kept.txt") as temporary:
                    temporary.write_bytes(text)
            if save:
                runtime.save_checkpoint({"step": 1}, out / "checkpoint.pt")
                with runtime.atomic_output(out / "after.png") as temporary:
                    temporary.write_bytes(b"after the checkpoint")
            if fail:
                raise runtime.LessonError("the loss became nan at step 1")
        if not fail:
            runtime.run(main)
            return
        with pytest.raises(SystemExit) as exit_info:
            runtime.run(main)
        assert exit_info.value.code == 1

    fresh = tmp_path / "parent" / "fresh"
    failing(fresh, save=False)
    assert not (tmp_path / "parent").exists()  # folder, metrics.csv and figures: no trace
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "kept.txt").write_bytes(b"earlier")
    (earlier / "other.png").write_bytes(b"earlier")
    failing(earlier, save=False)
    assert sorted(path.name for path in earlier.iterdir()) == ["kept.txt", "other.png"]
    assert (earlier / "kept.txt").read_bytes() == b"earlier"  # put back: the earlier run lost nothing
    saved = tmp_path / "saved"
    failing(saved, save=True)
    assert sorted(path.name for path in saved.iterdir()) == [
        "after.png", "checkpoint.pt", "forward.png", "kept.txt", "metrics.csv"]
    assert (saved / "kept.txt").read_bytes() == b"replaced again"
    good = tmp_path / "good"  # a run that ends well (--sample-only saves no checkpoint) keeps its own files
    good.mkdir()
    (good / "kept.txt").write_bytes(b"earlier")
    failing(good, save=False, fail=False)
    assert sorted(path.name for path in good.iterdir()) == ["forward.png", "kept.txt", "metrics.csv"]
    assert (good / "kept.txt").read_bytes() == b"replaced again"


def test_outside_a_run_an_output_is_written_over_without_a_copy(tmp_path):
    """atomic_output in a notebook or a test (no runtime.run around it) keeps no provisional copy: nothing would
    take it back. A copy left by a run killed with SIGKILL is replaced by the next run's own."""
    (tmp_path / "samples.png").write_bytes(b"earlier")
    with runtime.atomic_output(tmp_path / "samples.png") as temporary:
        temporary.write_bytes(b"new")
    assert [path.name for path in tmp_path.iterdir()] == ["samples.png"]
    assert (tmp_path / "samples.png").read_bytes() == b"new"
    (tmp_path / ".samples.earlier.png").write_bytes(b"stale")

    def main():
        with runtime.atomic_output(tmp_path / "samples.png") as temporary:
            temporary.write_bytes(b"newer")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit):
        runtime.run(main)
    assert [path.name for path in tmp_path.iterdir()] == ["samples.png"]
    assert (tmp_path / "samples.png").read_bytes() == b"new"
