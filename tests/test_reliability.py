"""The promises of ../shared/DESIGN.md kept by every lesson: Ctrl-C, non-finite losses, --resume with nothing to
resume, corrupt data and unwritable output folders. Each lesson runs in this process with tiny settings, its
errors going through utils.runtime.run exactly as on the command line."""
import pytest
import torch

from conftest import assert_refused, load_lesson, write_mnist_like
from utils.runtime import load_checkpoint, run

NET = ["--width", "8", "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "2"]
LESSONS = {  # file, tiny flags, the function that computes the training loss, the sampler's inner step
    "01": ("01_ddpm_toy.py", ["--width", "8", "--batch-size", "16", "--num-samples", "2"], "loss_fn", "sample_step"),
    "02": ("02_ddpm.py", [*NET, "--warmup-steps", "2", "--checkpoint-every", "2"], "loss_fn", "sample_step"),
    "03": ("03_conditional_ddpm.py", [*NET, "--warmup-steps", "2", "--checkpoint-every", "2"], "loss_fn",
           "sample_step"),
    "04": ("04_ddim_fast_sampling.py", [*NET, "--steps", "4"], "loss_fn", "ddim_step"),
    "05": ("05_latent_diffusion.py", ["--autoencoder-width", "8", "--width", "8", "--batch-size", "64", "--steps", "4",
                                      "--num-samples", "2"], "loss_fn", "ddim_sample"),
}
_loaded = {}


def lesson_module(key):
    if key not in _loaded:
        _loaded[key] = load_lesson(LESSONS[key][0])
    return _loaded[key]


def run_main(module, argv, capsys):
    """(exit code, the messages) of `python LESSON argv` run in this process: the lines of stderr as a terminal
    shows them (what follows the last carriage return of each line), without the progress bars."""
    try:
        run(lambda: module.main([str(arg) for arg in argv]))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    shown = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]
    return code, [line for line in shown if line.strip() and not line.startswith(("training", "sampling", "DDIM"))]


def all_finite(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [tensor for key in ("model", "ema", "autoencoder") if key in state for tensor in state[key].values()]
    return tensors and all(torch.isfinite(tensor).all() for tensor in tensors if tensor.is_floating_point())


@pytest.mark.parametrize("key,loss_name", [("01", "loss_fn"), ("02", "loss_fn"), ("03", "loss_fn"),
                                           ("04", "loss_fn"), ("05", "loss_fn"), ("05", "autoencoder_loss")])
def test_a_non_finite_loss_stops_with_one_line_and_writes_no_non_finite_checkpoint(key, loss_name, tiny_data_dir,
                                                                                  tmp_path, monkeypatch, capsys):
    module, (_, tiny, _, _) = lesson_module(key), LESSONS[key]
    real, calls = getattr(module, loss_name), []

    def exploding(*arguments):
        calls.append(1)
        result = real(*arguments)
        if len(calls) <= 3:
            return result
        return (result[0] * float("nan"), result[1]) if isinstance(result, tuple) else result * float("nan")

    monkeypatch.setattr(module, loss_name, exploding)
    out = tmp_path / "out"
    code, lines = run_main(module, ["--data-dir", tiny_data_dir, "--out", out, "--max-steps", 8, *tiny], capsys)
    assert code == 1 and len(lines) == 1 and "loss became nan at step 3" in lines[0], lines
    written = [path for path in out.glob("*.pt")]
    assert all(all_finite(path) for path in written), written
    own = out / ("autoencoder.pt" if loss_name == "autoencoder_loss" else "checkpoint.pt")  # this stage's file
    assert (f"the last good checkpoint is {own}" if own.exists() else f"no checkpoint was saved yet ({own})") \
        in lines[0], lines
    assert not (out / "samples.npz").exists()


@pytest.mark.parametrize("key,loss_name", [("01", "loss_fn"), ("02", "loss_fn"), ("03", "loss_fn"),
                                           ("04", "loss_fn"), ("05", "loss_fn"), ("05", "autoencoder_loss")])
def test_ctrl_c_while_training_saves_a_checkpoint_and_says_how_to_resume(key, loss_name, tiny_data_dir, tmp_path,
                                                                         monkeypatch, capsys):
    import os
    import signal

    module, (_, tiny, _, _) = lesson_module(key), LESSONS[key]
    real, calls = getattr(module, loss_name), []

    def loss_then_ctrl_c(*arguments):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered in the middle of step 2
        return real(*arguments)

    monkeypatch.setattr(module, loss_name, loss_then_ctrl_c)
    out = tmp_path / "out"
    code, lines = run_main(module, ["--data-dir", tiny_data_dir, "--out", out, "--max-steps", 8, *tiny], capsys)
    assert code == 130 and len(lines) == 1 and "interrupted at step 3" in lines[0] and "--resume" in lines[0], lines
    saved = out / ("autoencoder.pt" if loss_name == "autoencoder_loss" else "checkpoint.pt")
    assert torch.load(saved, map_location="cpu", weights_only=True)["step"] == 3  # the step it was in finished
    assert not (out / "samples.npz").exists()


@pytest.mark.parametrize("key", list(LESSONS))
def test_ctrl_c_while_sampling_exits_cleanly_and_keeps_the_trained_checkpoint(key, tiny_data_dir, tmp_path,
                                                                              monkeypatch, capsys):
    module, (_, tiny, _, step_name) = lesson_module(key), LESSONS[key]

    def pressed_ctrl_c(*arguments, **keywords):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, step_name, pressed_ctrl_c)
    out = tmp_path / "out"
    code, lines = run_main(module, ["--data-dir", tiny_data_dir, "--out", out, "--max-steps", 2, *tiny], capsys)
    assert code == 130 and lines == ["interrupted"], lines  # one line, no traceback
    assert load_checkpoint(out / "checkpoint.pt", module.LESSON)["step"] == 2
    assert not (out / "samples.npz").exists()


@pytest.mark.parametrize("key", list(LESSONS))
def test_resume_with_nothing_to_resume_fails_loudly(key, tiny_data_dir, tmp_path, capsys):
    module, (_, tiny, _, _) = lesson_module(key), LESSONS[key]
    out = tmp_path / "out"
    code, lines = run_main(module, ["--resume", "--data-dir", tiny_data_dir, "--out", out, "--max-steps", 2, *tiny],
                           capsys)
    assert code == 1 and len(lines) == 1 and "no checkpoint" in lines[0] and str(out) in lines[0], lines
    assert not list(out.glob("*.pt"))  # it did not quietly start afresh


@pytest.mark.parametrize("key", list(LESSONS))
def test_a_corrupt_data_dir_gives_one_line_naming_the_file_and_writes_nothing(key, tmp_path, capsys):
    module, (_, tiny, _, _) = lesson_module(key), LESSONS[key]
    folder = tmp_path / "data" / "MNIST" / "raw"
    write_mnist_like(folder, count=64, compress=False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-500])  # a download cut short
    out = tmp_path / "out"
    code, lines = run_main(module, ["--dataset", "mnist", "--data-dir", tmp_path / "data", "--out", out,
                                    "--max-steps", 2, *tiny], capsys)
    assert code == 1 and len(lines) == 1 and str(images) in lines[0] and "truncated or corrupt" in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("key", list(LESSONS))
@pytest.mark.parametrize("flags,expected", [
    (["--num-samples", "0"], "--num-samples: must be at least 1"),
    (["--batch-size", "-3"], "--batch-size: must be at least 1"),
    (["--max-steps", "0"], "--max-steps: must be at least 1"),
    (["--dataset", "imagenet"], "--dataset: 'imagenet' is neither a dataset"),
    (["--device", "tpu"], "--device: invalid choice"),
])
def test_bad_counts_and_names_are_refused_by_every_lesson(key, flags, expected, capsys):
    assert_refused(lesson_module(key).parse_args, flags, expected, capsys)


@pytest.mark.parametrize("key", list(LESSONS))
def test_an_unwritable_output_folder_is_refused_by_every_lesson(key, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_refused(lesson_module(key).parse_args, ["--out", blocker / "out"], f"{blocker} is a file", capsys)
    assert blocker.read_text() == "not a folder"



def test_lesson04_resume_is_exact(tiny_data_dir, tmp_path, monkeypatch):
    """Lesson 04 trains lesson 02's model when given no checkpoint: N steps straight and N/2 + resume + N/2
    end in identical model, EMA and optimizer states (lessons 01, 02, 03 and 05 have their own such test)."""
    module = lesson_module("04")
    monkeypatch.setattr(module, "write_samples", lambda *arguments: [])  # the training state is what counts
    common = ["--data-dir", tiny_data_dir, *LESSONS["04"][1], "--device", "cpu"]
    module.main([str(arg) for arg in ["--out", tmp_path / "straight", "--max-steps", 8, *common]])
    module.main([str(arg) for arg in ["--out", tmp_path / "split", "--max-steps", 4, *common]])
    module.main([str(arg) for arg in ["--out", tmp_path / "split", "--max-steps", 8, "--resume", *common]])
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt", module.LESSON)
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt", module.LESSON)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[name], state_b[name]) for name in ("exp_avg", "exp_avg_sq"))
