"""Lesson 01 from the command line, as a learner runs it, with tiny settings."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_refused, run_in_process, run_lesson
from utils.runtime import load_checkpoint, run

TINY = ["--width", "8", "--batch-size", "32", "--num-samples", "4", "--timesteps", "50"]  # T = 50: sampling is cheap
OUTPUTS = ["forward.png", "checkpoint.pt", "samples.png", "samples.npz", "loss.png", "metrics.csv", "denoising.gif",
           "denoising.png"]


def lesson(*args):
    return run_lesson("01_ddpm_toy.py", *args)


@pytest.fixture
def cli(lesson01, capsys):
    """`python 01_ddpm_toy.py ARGS` in this process (conftest.run_in_process): -> returncode, stdout, stderr."""
    return lambda *args: run_in_process(lesson01.main, "01_ddpm_toy.py", *args, capsys=capsys)


def test_end_to_end_writes_every_output(tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    result = lesson("--data-dir", tiny_data_dir, "--out", out, "--max-steps", 20, *TINY)
    assert result.returncode == 0, result.stderr
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
        assert result.stdout.count(f"wrote {out / name}") == 1, name  # each announced once
    samples = np.load(out / "samples.npz")["images"]
    assert samples.dtype == np.uint8 and samples.shape == (4, 28, 28, 1)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,images_per_s" and rows[-1].startswith("20,")
    checkpoint = load_checkpoint(out / "checkpoint.pt", "01_ddpm_toy")
    assert checkpoint["step"] == 20 and checkpoint["config"]["dataset"] == "mnist"
    assert checkpoint["config"]["timesteps"] == 50 and "(50 steps)" in result.stdout


def test_sample_only_writes_samples_from_a_checkpoint(tiny_data_dir, tmp_path, cli):
    trained = tmp_path / "trained"
    assert cli("--data-dir", tiny_data_dir, "--out", trained, "--max-steps", 5, *TINY).returncode == 0
    out = tmp_path / "sampled"
    result = cli("--sample-only", "--checkpoint", trained / "checkpoint.pt", "--num-samples", 6,
                 "--sample-batch-size", 4, "--out", out)  # batches of 4 and 2
    assert result.returncode == 0, result.stderr
    assert np.load(out / "samples.npz")["images"].shape == (6, 28, 28, 1)
    assert not (out / "checkpoint.pt").exists()
    assert "(50 steps)" in result.stdout  # the checkpoint's own T, without --timesteps
    refused = cli("--sample-only", "--checkpoint", trained / "checkpoint.pt", "--timesteps", 1000, "--out", out)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"error: {trained / 'checkpoint.pt'} was trained with --timesteps 50; it cannot be used with --timesteps 1000"]


def test_ctrl_c_saves_and_resume_finishes_exactly_like_an_uninterrupted_run(tiny_data_dir, tmp_path, cli):
    # On the CPU: exactness is a CPU promise (GPU convolutions may be non-deterministic). Only the interrupted
    # run needs its own process (it gets the signal); the other two run in this one.
    # Interrupted once the first metrics row (step 50) is written, a few steps later at most.
    steps = ["--max-steps", 70, "--data-dir", tiny_data_dir, *TINY, "--batch-size", 16, "--num-samples", 1,
             "--device", "cpu"]
    straight = cli("--out", tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stderr

    command = [sys.executable, str(ROOT / "01_ddpm_toy.py"), "--out", str(tmp_path / "split"), *map(str, steps)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "split" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 1):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    stopped_at = load_checkpoint(tmp_path / "split" / "checkpoint.pt", "01_ddpm_toy")["step"]
    assert 50 <= stopped_at < 70

    resumed = cli("--out", tmp_path / "split", "--resume", *steps)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt", "01_ddpm_toy")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt", "01_ddpm_toy")
    assert a["step"] == b["step"] == 70
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.parametrize("flags,expected", [
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--max-steps", "-3"], "--max-steps: must be at least 1"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--num-samples", "0"], "--num-samples: must be at least 1"),
    (["--lr", "0"], "--lr: must be a finite number above 0"),
    (["--lr", "nan"], "--lr: must be a finite number above 0"),
    (["--dataset", "imagenet"], "'imagenet' is neither a dataset (mnist, fashion-mnist, cifar10) nor a folder"),
    (["--width", "12"], "--width must be a multiple of 8"),
    (["--epochs", "2", "--max-steps", "5"], "not allowed with argument"),
    (["--resume", "--sample-only"], "cannot be used together"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--timesteps", "20"], "more than 20 with the linear schedule"),
    (["--timesteps", "0"], "--timesteps: must be at least 1"),
])
def test_bad_flags_exit_2_with_one_line(lesson01, capsys, flags, expected):
    assert_refused(lesson01.parse_args, flags, expected, capsys)


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli("--out", blocker / "out", "--data-dir", tmp_path / "nothing")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"01_ddpm_toy.py: error: argument --out: cannot create "
                                                  f"{blocker / 'out'}: {blocker} is a file"]


def run_main(lesson01, argv):
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: lesson01.main(argv))
    return exit_info.value.code


def test_no_data_anywhere_gives_one_line_that_says_how_to_fix_it(lesson01, tmp_path, capsys):
    code = run_main(lesson01, ["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: mnist is not available: no files in")
    assert "download failed (network disabled in tests)" in lines[0]
    assert "fashion-mnist" in lines[0] and "apt-get install dataset-fashion-mnist" in lines[0]
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_default_dataset_falls_back_with_a_notice(lesson01, tmp_path, capsys):
    data_dir = tmp_path / "data"
    from conftest import write_mnist_like
    write_mnist_like(data_dir / "FashionMNIST" / "raw")
    argv = ["--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--max-steps", "2", *TINY]
    lesson01.main(argv)
    out = capsys.readouterr().out
    assert "note: mnist is not available here" in out and "using fashion-mnist" in out
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt", "01_ddpm_toy")["config"]["dataset"] == "fashion-mnist"


def test_a_dataset_named_explicitly_is_never_swapped(lesson01, tmp_path, capsys):
    data_dir = tmp_path / "data"
    from conftest import write_mnist_like
    write_mnist_like(data_dir / "FashionMNIST" / "raw")
    code = run_main(lesson01, ["--dataset", "mnist", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")])
    assert code == 1
    assert "error: mnist is not available" in capsys.readouterr().err


def test_resume_without_a_checkpoint_fails_loudly(lesson01, tiny_data_dir, tmp_path, capsys):
    code = run_main(lesson01, ["--resume", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"error: no checkpoint at {tmp_path / 'out' / 'checkpoint.pt'}"


def test_resume_with_another_architecture_is_refused(lesson01, tiny_data_dir, tmp_path, capsys, float32_on_device):
    out = tmp_path / "out"
    lesson01.main(["--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "2", *TINY])
    before = (out / "checkpoint.pt").read_bytes()
    code = run_main(lesson01, ["--resume", "--data-dir", str(tiny_data_dir), "--out", str(out),
                               "--max-steps", "4", "--width", "16", "--batch-size", "32"])
    assert code == 1
    assert "was trained with width=8, this run has width=16" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    code = run_main(lesson01, ["--resume", "--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "4",
                               *TINY[:-1], "100"])  # another T
    assert code == 1
    assert "was trained with --timesteps 50; it cannot be used with --timesteps 100" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    code = run_main(lesson01, ["--resume", "--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "4",
                               *TINY, "--snr-gamma", "0"])  # another loss
    assert code == 1
    assert "was trained with snr_gamma=5.0, this run has snr_gamma=0.0" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_training_and_sampling_use_the_cpus_channels_last_model_and_six_epochs_by_default(
        lesson01, tiny_data_dir, tmp_path, monkeypatch, float32_on_device):
    assert lesson01.parse_args([]).epochs == 6  # what the README's and the docstring's times were measured with
    layouts = []
    build_model = lesson01.build_model

    def recording(config, device):
        model = build_model(config, device)
        weight = model.down1.conv1.weight  # [w, w, 3, 3]: not the 1-channel stem, whose two layouts coincide
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
        return model
    monkeypatch.setattr(lesson01, "build_model", recording)
    out = tmp_path / "out"
    lesson01.main(["--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "2", "--device", "cpu", *TINY])
    lesson01.main(["--sample-only", "--out", str(out), "--num-samples", "2", "--device", "cpu"])
    assert layouts == [True, True]


def test_snr_gamma_reaches_the_loss_and_the_checkpoint_and_old_checkpoints_resume_with_the_plain_loss(
        lesson01, tiny_data_dir, tmp_path, monkeypatch, float32_on_device):
    used = []
    loss_fn = lesson01.loss_fn
    monkeypatch.setattr(lesson01, "loss_fn", lambda *args: used.append(args[4]) or loss_fn(*args))
    out = tmp_path / "out"
    lesson01.main(["--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "2", *TINY, "--snr-gamma", "0"])
    assert used == [0.0, 0.0]
    checkpoint = load_checkpoint(out / "checkpoint.pt", "01_ddpm_toy")
    assert checkpoint["config"]["snr_gamma"] == 0.0
    del checkpoint["config"]["snr_gamma"]  # as saved before --snr-gamma existed: trained with the plain loss
    torch.save(checkpoint, out / "checkpoint.pt")
    lesson01.main(["--resume", "--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "3", *TINY,
                   "--snr-gamma", "0"])
    assert used == [0.0, 0.0, 0.0]


def test_help_lists_every_flag(lesson01, capsys):
    with pytest.raises(SystemExit):
        lesson01.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ["--dataset", "--data-dir", "--epochs", "--max-steps", "--batch-size", "--lr", "--seed",
                 "--device", "--out", "--num-samples", "--resume", "--sample-only", "--checkpoint", "--width",
                 "--timesteps", "--snr-gamma"]:
        assert flag in text
    assert "paper: 2e-4" in text
