"""Lesson 02 as a learner runs it: outputs, checkpoints, resume, Ctrl-C, several processes, bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (
    ROOT, assert_refused, assert_sampling_uses_the_ema_weights, load_lesson, run_in_process, run_lesson, write_idx,
)
from utils.runtime import load_checkpoint, run

TINY = ["--width", "8", "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "2", "--warmup-steps", "5",
        "--timesteps", "25"]  # T = 25: sampling is cheap
OUTPUTS = ["checkpoint.pt", "samples.png", "samples.npz", "loss.png", "metrics.csv", "denoising.gif", "denoising.png",
           "schedules.png"]


@pytest.fixture(scope="module")
def lesson02():
    return load_lesson("02_ddpm.py")


def lesson(*args):
    return run_lesson("02_ddpm.py", *args)


@pytest.fixture
def cli(lesson02, capsys):
    """`python 02_ddpm.py ARGS` in this process (conftest.run_in_process): -> returncode, stdout, stderr."""
    return lambda *args: run_in_process(lesson02.main, "02_ddpm.py", *args, capsys=capsys)


def test_end_to_end_writes_every_output(tiny_data_dir, tmp_path, cli):
    out = tmp_path / "out"  # in this process: the lesson as its own process is run by the Ctrl-C and gloo tests
    result = cli("--data-dir", tiny_data_dir, "--out", out, "--max-steps", 12, "--checkpoint-every", 5, *TINY)
    assert result.returncode == 0, result.stderr
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
        assert f"wrote {out / name}" in result.stdout
    samples = np.load(out / "samples.npz")["images"]
    assert samples.dtype == np.uint8 and samples.shape == (2, 28, 28, 1)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,images_per_s" and rows[-1].startswith("12,")
    checkpoint = load_checkpoint(out / "checkpoint.pt", "02_ddpm")
    assert checkpoint["step"] == 12 and checkpoint["config"]["schedule"] == "cosine"
    assert checkpoint["config"]["timesteps"] == 25 and "(25 steps)" in result.stdout  # --timesteps 25 in TINY
    assert {"model", "ema", "optimizer", "scaler", "rng", "epoch", "config"} <= set(checkpoint)
    assert "1 process(es) = 16 images" in result.stdout
    # the default --ema-decay 0.999 is reached from step 8990 on: 12 steps are told that the warm-up decides
    assert "note: --ema-decay 0.999 takes effect only from step 8990; in these 12 steps" in result.stdout
    assert result.stdout.count("note: --ema-decay") == 1


def test_cifar_shaped_data_trains_and_samples(tmp_path, lesson02, monkeypatch, float32_on_device):
    """3 x 32 x 32 images: the network adapts to channels and size."""
    from utils import data

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 3, 32, 32)).astype(np.uint8)
    monkeypatch.setattr(data, "_load_cifar", lambda data_dir, split, download: (images, np.arange(40) % 10))
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    out = tmp_path / "out"
    lesson02.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                   "--max-steps", "3", *TINY])
    assert np.load(out / "samples.npz")["images"].shape == (2, 32, 32, 3)
    assert load_checkpoint(out / "checkpoint.pt", "02_ddpm")["config"]["channels"] == 3


def test_sample_only_uses_the_ema_weights(tiny_data_dir, tmp_path, lesson02, cli):
    trained = tmp_path / "trained"
    lesson02.main(["--data-dir", str(tiny_data_dir), "--out", str(trained), "--max-steps", "4", *TINY])
    out = tmp_path / "sampled"
    result = cli("--sample-only", "--checkpoint", trained / "checkpoint.pt", "--num-samples", 3, "--out", out,
                 "--variance", "beta", "--no-clip-x0", "--sample-batch-size", 2)
    assert result.returncode == 0, result.stderr
    assert np.load(out / "samples.npz")["images"].shape == (3, 28, 28, 1)
    assert not (out / "checkpoint.pt").exists()
    assert_sampling_uses_the_ema_weights(trained / "checkpoint.pt", lambda path, folder: lesson02.main(
        ["--sample-only", "--checkpoint", str(path), "--num-samples", "2", "--out", str(folder)]), tmp_path)


def checkpoint_states(path):
    state = load_checkpoint(path, "02_ddpm")
    return state["step"], state["model"], state["ema"], state["optimizer"]["state"]


def assert_same_states(a, b):
    assert a[0] == b[0]
    for first, second in zip(a[1:3], b[1:3]):
        for name, tensor in first.items():
            assert torch.equal(tensor, second[name]), name
    for index, moments in a[3].items():
        for key, tensor in moments.items():
            assert torch.equal(tensor, b[3][index][key]), (index, key)


def test_resume_gives_exactly_the_weights_of_an_uninterrupted_run(tiny_data_dir, tmp_path, lesson02, monkeypatch):
    # Dropout on, so that the random state of dropout must be restored too.
    monkeypatch.setattr(lesson02, "write_samples", lambda *arguments: [])  # the training state is what counts
    monkeypatch.setattr(lesson02.visualize, "save_schedules", lambda *arguments: "schedules.png")
    common = ["--data-dir", str(tiny_data_dir), *TINY, "--dropout", "0.1", "--num-samples", "1", "--device", "cpu"]
    lesson02.main(["--out", str(tmp_path / "straight"), "--max-steps", "24", *common])
    lesson02.main(["--out", str(tmp_path / "split"), "--max-steps", "12", *common])
    lesson02.main(["--out", str(tmp_path / "split"), "--max-steps", "24", "--resume", *common])
    # 256 images / 16 = 16 steps per epoch: the resume also crosses an epoch boundary.
    assert_same_states(checkpoint_states(tmp_path / "straight" / "checkpoint.pt"),
                       checkpoint_states(tmp_path / "split" / "checkpoint.pt"))
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step") and rows.count(rows[0]) == 1  # one header: the log was appended to


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data_dir, tmp_path, lesson02, monkeypatch,
                                                                  capsys):
    out = tmp_path / "out"
    args = ["--data-dir", str(tiny_data_dir), "--out", str(out), *TINY, "--checkpoint-every", "4"]
    real_loss, calls = lesson02.loss_fn, []

    def loss_that_explodes(*arguments):
        calls.append(1)
        loss = real_loss(*arguments)
        return loss * float("nan") if len(calls) > 6 else loss

    monkeypatch.setattr(lesson02, "loss_fn", loss_that_explodes)
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: lesson02.main(args + ["--max-steps", "20"]))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "loss became nan at step 6" in error and "Traceback" not in error
    state = load_checkpoint(out / "checkpoint.pt", "02_ddpm")
    assert state["step"] == 4
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())


def test_two_processes_with_gloo(tiny_data_dir, tmp_path):
    """torchrun with 2 CPU processes: DistributedDataParallel over gloo, rank 0 alone writes files."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "02_ddpm.py"), "--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "6",
               "--device", "cpu", *TINY]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sampled 2 images") == 1  # rank 0 only
    assert "2 process(es) = 32 images" in result.stdout
    state = load_checkpoint(out / "checkpoint.pt", "02_ddpm")
    assert state["step"] == 6 and state["config"]["world_size"] == 2 and len(state["rng"]) == 2
    # The two processes drew different noise (their generators were seeded apart).
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])
    assert np.load(out / "samples.npz")["images"].shape == (2, 28, 28, 1)
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # no stray temporary files


def test_more_processes_than_gpus_is_refused(monkeypatch, lesson02):
    monkeypatch.setattr(lesson02, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device on a missing GPU"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(lesson02.LessonError, match="process 1 on this machine has no GPU: 1 visible"):
        lesson02.setup_processes("auto")


def test_resume_refuses_a_different_architecture(tiny_data_dir, tmp_path, lesson02, capsys):
    out = tmp_path / "out"
    lesson02.main(["--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "2", *TINY])
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: lesson02.main(["--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "4",
                                   "--resume", *TINY, "--schedule", "linear"]))
    assert exit_info.value.code == 1
    assert "schedule=cosine, this run has schedule=linear" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: lesson02.main(["--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "4",
                                   "--resume", *TINY, "--timesteps", "50"]))
    assert exit_info.value.code == 1
    assert "trained with --timesteps 25; it cannot be used with --timesteps 50" in capsys.readouterr().err


def test_resume_without_a_checkpoint_fails_loudly(tiny_data_dir, tmp_path, cli):
    result = cli("--data-dir", tiny_data_dir, "--out", tmp_path / "empty", "--resume", *TINY)
    assert result.returncode == 1 and "no checkpoint at" in result.stderr and "Traceback" not in result.stderr


def test_lesson01_checkpoint_is_refused(tmp_path, cli):
    from utils.runtime import CHECKPOINT_FORMAT, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": "01_ddpm_toy", "config": {}}, path)
    result = cli("--sample-only", "--checkpoint", path, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {path} is a checkpoint of lesson 01_ddpm_toy, not of 02_ddpm"


@pytest.mark.parametrize("flags,expected", [
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--batch-size", "-1"], "--batch-size: must be at least 1"),
    (["--lr", "0"], "--lr: must be a finite number above 0"),
    (["--schedule", "quadratic"], "--schedule: invalid choice"),
    (["--channel-mults", "1,x"], "--channel-mults: '1,x' is not a comma-separated list"),
    (["--channel-mults", "2"], "need at least two multipliers"),
    (["--width", "9"], "--width must be even (the time embedding pairs a sine and a cosine"),
    (["--ema-decay", "1.0"], "--ema-decay must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--dataset", "imagenet"], "--dataset: 'imagenet' is neither a dataset"),
    (["--resume", "--sample-only"], "cannot be used together"),
])
def test_bad_flags_exit_2_with_one_line(flags, expected, tmp_path, lesson02, capsys):
    assert_refused(lesson02.parse_args, ["--out", str(tmp_path / "out"), *flags], expected, capsys)


def test_a_bad_flag_on_the_command_line_stops_before_any_work(tmp_path, cli):
    result = cli("--out", tmp_path / "out", "--epochs", "0")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("error: argument --epochs: must be at least 1, got 0")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_mixed_precision_on_cpu_is_refused_not_swapped(tiny_data_dir, tmp_path, cli):
    result = cli("--data-dir", tiny_data_dir, "--out", tmp_path / "out", "--precision", "fp16", *TINY,
                 "--max-steps", "2", "--device", "cpu")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --precision fp16 needs a CUDA device; on cpu use --precision fp32"


def test_images_too_small_for_the_levels_are_refused(tmp_path, cli):
    data_dir = tmp_path / "data"
    write_idx(data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((64, 28, 28)))
    write_idx(data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(64))
    result = cli("--data-dir", data_dir, "--out", tmp_path / "out", "--channel-mults", "1,2,2,2", "--width", "8")
    assert result.returncode == 1
    assert "28 cannot be halved 3 times" in result.stderr and "Traceback" not in result.stderr
