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
    if not written:  # a fresh run that saved nothing leaves no trace: not even the metrics.csv it began (issue 38)
        assert not out.exists(), sorted(path.name for path in out.iterdir())


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


# --- a failed or refused run leaves the earlier good run as it was (and no trace of itself) ---

@pytest.mark.parametrize("key", list(LESSONS))
def test_a_refused_run_leaves_no_output_folder_behind(key, tiny_data_dir, tmp_path, capsys):
    module, (_, tiny, _, _) = lesson_module(key), LESSONS[key]
    out = tmp_path / "new" / "deeper" / "out"
    code, lines = run_main(module, ["--resume", "--data-dir", tiny_data_dir, "--out", out, "--max-steps", 2, *tiny],
                           capsys)
    assert code == 1 and len(lines) == 1 and "no checkpoint" in lines[0], lines
    assert not (tmp_path / "new").exists()  # neither the folder nor the parents it would have made
    existing = tmp_path / "kept"
    existing.mkdir()
    code, _ = run_main(module, ["--resume", "--data-dir", tiny_data_dir, "--out", existing, *tiny], capsys)
    assert code == 1 and existing.is_dir()  # a folder the user had is never removed


def test_refused_tools_leave_no_output_folder_behind(tiny_data_dir, tmp_path, capsys):
    edit = load_lesson("examples/edit_images.py")
    code, lines = run_main(edit, ["sdedit", "--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "e" / "out",
                                  "--data-dir", tiny_data_dir], capsys)
    assert code == 1 and "no checkpoint at" in lines[-1] and not (tmp_path / "e").exists(), lines
    getting_started = load_lesson("GETTING_STARTED.py")
    report = getting_started.Report()
    getting_started.check_output(report, tmp_path / "g" / "outputs")
    assert not report.problems and not (tmp_path / "g").exists()  # it wrote there, then tidied up


@pytest.mark.parametrize("key", list(LESSONS))
def test_a_fresh_run_that_fails_leaves_the_earlier_run_in_its_folder_as_it_was(key, tiny_data_dir, tmp_path,
                                                                                monkeypatch, capsys):
    """A good run, then a fresh run (no --resume) in the same folder whose loss is nan at step 1: every file of
    the good run is byte for byte as it was (metrics.csv, and the figures the failed run drew over before its first
    step), nothing of the failed run is left, and the message does not call the earlier run's checkpoint this run's
    last good one."""
    module, (_, tiny, loss_name, _) = lesson_module(key), LESSONS[key]
    out, short = tmp_path / "out", ["--timesteps", 40]  # a short chain: lesson 03 samples every class
    code, lines = run_main(module, ["--data-dir", tiny_data_dir, "--out", out, "--max-steps", 2, *short, *tiny],
                           capsys)
    assert code == 0, lines
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert "metrics.csv" in before and len(before["metrics.csv"].splitlines()) >= 2
    real = getattr(module, loss_name)

    def nan_loss(*arguments):
        result = real(*arguments)
        return (result[0] * float("nan"), result[1]) if isinstance(result, tuple) else result * float("nan")

    monkeypatch.setattr(module, loss_name, nan_loss)
    other = ["--timesteps", 30]  # another chain: the figures it draws before training (lesson 01's forward.png)
    code, lines = run_main(module, ["--data-dir", tiny_data_dir, "--out", out, "--max-steps", 2, *other, *tiny],
                           capsys)  # differ from the good run's, and are put back when it fails
    assert code == 1 and len(lines) == 1 and "loss became nan at step" in lines[0], lines
    assert "this run saved nothing, and the earlier run's" in lines[0] and "are untouched" in lines[0], lines
    assert "the last good checkpoint" not in lines[0], lines
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_outputs_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Ctrl-C or a full disk while samples.png, samples.npz or a figure is written leaves the earlier file as it
    was and no partial file; the full disk is one line that says what ran out."""
    import errno

    import imageio.v2 as imageio

    from utils import runtime, visualize

    images = torch.rand(4, 1, 8, 8) * 2 - 1
    path = visualize.save_grid(images, tmp_path / "samples.png")
    visualize.save_samples_npz(images, tmp_path / "samples.npz")
    good = {name: (tmp_path / name).read_bytes() for name in ("samples.png", "samples.npz")}
    real_imwrite = imageio.imwrite

    def half_then(error):
        def write(target, picture, *arguments, **keywords):
            real_imwrite(target, picture, *arguments, **keywords)
            with open(target, "r+b") as file:
                file.truncate(20)  # half written ...
            raise error  # ... when the key or the disk gave out
        return write

    for error in (KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        monkeypatch.setattr(visualize.imageio, "imwrite", half_then(error))
        if isinstance(error, KeyboardInterrupt):
            with pytest.raises(KeyboardInterrupt):
                visualize.save_grid(-images, path)
        else:
            with pytest.raises(runtime.LessonError) as failed:
                visualize.save_grid(-images, path)
            assert str(failed.value).startswith(f"could not write {path}: ") and "the disk is full" in \
                str(failed.value) and "\n" not in str(failed.value)
        assert path.read_bytes() == good["samples.png"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz", "samples.png"]  # no partial file


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError from its zip writer; the previous checkpoint survives."""
    import shutil
    from collections import namedtuple

    from utils import runtime

    path = tmp_path / "checkpoint.pt"
    runtime.save_checkpoint({"step": 1}, path)
    good = path.read_bytes()
    real_save = torch.save

    def full_disk(state, file):
        real_save(state, file)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304")

    monkeypatch.setattr(runtime.torch, "save", full_disk)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(2 ** 30, 2 ** 30, 0))
    with pytest.raises(runtime.LessonError) as failed:
        runtime.save_checkpoint({"step": 2}, path)
    message = str(failed.value)
    assert message.startswith(f"could not write {path}: the disk is full (0 MiB free)") and "\n" not in message
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_metrics_csv_has_its_header_on_disk_from_the_start_and_an_empty_one_gets_it_on_resume(tmp_path):
    """A run killed (kill -9) before its first row left an empty metrics.csv, and every --resume then appended rows
    with no header; now the header is flushed at once, and an empty file being appended to gets one."""
    from utils.runtime import MetricsLog

    log = MetricsLog(tmp_path / "metrics.csv", append=False)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [",".join(MetricsLog.FIELDS)]  # before close
    log.close()
    (tmp_path / "metrics.csv").write_text("")
    log = MetricsLog(tmp_path / "metrics.csv", append=True)
    log.write(7, 0.5, 1e-3, 100.0)
    log.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [",".join(MetricsLog.FIELDS),
                                                                   "7,0.500000,1.000e-03,100.0"]


# --- a flag the user gave acts, or is refused in one line ---

@pytest.mark.parametrize("key", list(LESSONS))
def test_flags_a_run_would_ignore_are_refused_in_one_line_and_the_run_changes_nothing(key, tiny_data_dir, tmp_path,
                                                                                      capsys):
    """After a good run: sampling it with a network flag that differs from the checkpoint's, or with a training flag
    (it trains nothing), --checkpoint without --sample-only, --resume shorter than the checkpoint's step, and a
    batch larger than the data are each refused in one line, and the run's files stay as they were."""
    module, (_, tiny, _, _) = lesson_module(key), LESSONS[key]
    out = tmp_path / "out"
    good = ["--data-dir", tiny_data_dir, "--out", out, "--max-steps", 2, "--timesteps", 40, *tiny]
    code, lines = run_main(module, good, capsys)
    assert code == 0, lines
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    checkpoint = out / "checkpoint.pt"
    sample = ["--data-dir", tiny_data_dir, "--out", out, "--timesteps", 40, "--num-samples", 2,
              *(["--steps", 4] if key in ("04", "05") else []),
              *(["--checkpoint", checkpoint] if key == "04" else ["--sample-only", "--checkpoint", checkpoint])]
    cases = [  # (command line, exit code, what the one line must say)
        ([*sample, "--width", 16], 1, "not --width 16: the network comes from the checkpoint"),
        ([*sample, "--lr", 0.5], 1, "--lr does nothing"),
        ([*sample, "--lr", 0.5, "--max-steps", 9], 1, "--max-steps, --lr do nothing"),
        ([*good, "--resume", "--max-steps", 1], 1, "is at step 2, past the 1 steps this run asks for"),
        ([*good, "--batch-size", 100_000], 1, "cannot fill one batch of 100000"),
    ]
    if key != "04":  # lesson 04 samples the checkpoint it is given; the others read one only to sample it
        cases.append(([*good, "--checkpoint", checkpoint], 2, "--checkpoint is read only with --sample-only"))
    for argv, expected_code, expected in cases:
        code, lines = run_main(module, argv, capsys)
        assert code == expected_code and len(lines) == 1 and expected in lines[0], (argv, lines)
        assert {path.name: path.read_bytes() for path in out.iterdir()} == before, argv
    code, lines = run_main(module, [*sample, "--width", 8], capsys)  # the checkpoint's own value is accepted
    assert code == 0, lines


def test_lesson02_resume_uses_the_weight_decay_given_and_keeps_the_saved_one_otherwise(tiny_data_dir, tmp_path,
                                                                                      capsys):
    module, (_, tiny, _, _) = lesson_module("02"), LESSONS["02"]
    out = tmp_path / "out"
    common = ["--data-dir", tiny_data_dir, "--out", out, "--timesteps", 40, *tiny]
    assert run_main(module, [*common, "--max-steps", 2, "--weight-decay", 0.25], capsys)[0] == 0
    assert run_main(module, [*common, "--max-steps", 4, "--resume"], capsys)[0] == 0
    groups = load_checkpoint(out / "checkpoint.pt", module.LESSON)["optimizer"]["param_groups"]
    assert {group["weight_decay"] for group in groups} == {0.25}  # not given: the run's own value goes on
    assert run_main(module, [*common, "--max-steps", 6, "--resume", "--weight-decay", 0.5], capsys)[0] == 0
    groups = load_checkpoint(out / "checkpoint.pt", module.LESSON)["optimizer"]["param_groups"]
    assert {group["weight_decay"] for group in groups} == {0.5}  # given: it acts


def test_eta_is_refused_where_no_sampler_has_noise(capsys):
    compare = load_lesson("examples/compare_methods.py")
    assert_refused(compare.parse_args, ["--samplers", "dpm-solver++", "--eta", "0.5"], "--eta is DDIM's noise", capsys)
    assert compare.parse_args(["--samplers", "ddim,dpm-solver++", "--eta", "0,0.5"]).eta == (0.0, 0.5)
    assert_refused(lesson_module("04").parse_args, ["--sampler", "dpm-solver++", "--eta", "0.5"],
                   "--eta is DDIM's noise", capsys)


@pytest.mark.parametrize("key", ["04", "05"])
def test_steps_beyond_the_default_T_wait_for_the_checkpoint_s_own_T(key, capsys):
    """A checkpoint trained with --timesteps 2000 may be sampled in 1500 steps: the check waits for its T."""
    parse_args = lesson_module(key).parse_args
    reading = ["--checkpoint", "c.pt"] if key == "04" else ["--sample-only"]
    assert parse_args([*reading, "--steps", "1500"]).steps == 1500
    assert parse_args(["--resume", "--steps", "1500"]).steps == 1500
    assert_refused(parse_args, ["--steps", "1500"], "--steps must be at most T = 1000", capsys)


@pytest.mark.parametrize("key", ["02", "03", "04"])
def test_every_copy_of_the_unet_refuses_the_same_levels_in_one_line_before_training(key, tiny_data_dir, tmp_path,
                                                                                    capsys):
    """Issue 38, kind 1: lessons 02, 03 and 04 build the same U-Net, so 28x28 pictures with four levels (halved
    three times: 28 -> 14 -> 7 -> 3, and the skip of 7 no longer fits) are refused by the one shared check
    (utils.data.check_unet_fits) in each, before any step, and leave no checkpoint."""
    module, (_, tiny, _, _) = lesson_module(key), LESSONS[key]
    out = tmp_path / "out"
    argv = ["--data-dir", tiny_data_dir, "--out", out, "--device", "cpu", "--max-steps", "2", "--timesteps", "25",
            *tiny, "--channel-mults", "1,2,2,2"]
    code, lines = run_main(module, argv, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "28x28: 28 cannot be halved 3 times by --channel-mults 1,2,2,2" in lines[0]
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("key", ["01", "02", "03", "04", "05"])
def test_every_lesson_answers_the_shared_checks_with_the_same_line(key, tiny_data_dir, tmp_path, capsys):
    """Issue 38, kind 1: what depends on the network or the data is checked in one place that every lesson calls:
    T (utils.runtime.check_timesteps: at least 2, and more than 20 on the linear schedule), a batch the data cannot
    fill (utils.data.batches_per_epoch), and, for the three copies of lesson 02's U-Net, --image-size against the
    levels and an odd --width (utils.data.check_unet_arguments). Each is refused with the same line everywhere."""
    module = lesson_module(key)
    assert_refused(module.parse_args, ["--timesteps", "1"], "--timesteps must be at least 2, and more than 20 with the "
                   "linear schedule (its last beta, 0.02 x 1000 / T, must stay below 1); got 1", capsys)
    if key in ("01", "02", "04"):  # the lessons with DDPM's linear schedule (lesson 01 has only it)
        linear = [] if key == "01" else ["--schedule", "linear"]
        assert_refused(module.parse_args, [*linear, "--timesteps", "20"], "more than 20 with the linear schedule",
                       capsys)
        assert module.parse_args([*linear, "--timesteps", "21"]).timesteps == 21
    if key in ("02", "03", "04"):
        folder = ["--dataset", str(tmp_path), "--image-size", "30"]
        assert_refused(module.parse_args, [*folder, "--channel-mults", "1,2,2"], "--image-size 30 cannot be halved 2 "
                       "times by the U-Net (--channel-mults): use a multiple of 4", capsys)
        assert_refused(module.parse_args, ["--width", "7"], "--width must be even (the time embedding pairs a sine and "
                       "a cosine per frequency), got 7", capsys)
    out = tmp_path / "out"
    code, lines = run_main(module, ["--data-dir", tiny_data_dir, "--out", out, "--device", "cpu", "--max-steps", "1",
                                    "--timesteps", "25", *LESSONS[key][1], "--batch-size", "100000"], capsys)
    assert code == 1 and lines == ["error: 256 images cannot fill one batch of 100000: pass a --batch-size of at most "
                                   "256"], lines
    assert not out.exists()


def test_lesson05_stage_flags_act_or_are_refused_in_one_line(tiny_data_dir, tmp_path, capsys):
    """Issue 38, kind 2, for lesson 05's two stages: --stage autoencoder refuses the diffusion and sampling flags;
    --autoencoder-epochs lengthens a --resume'd autoencoder that no diffusion model depends on, and is refused in
    one line where it would do nothing (no --resume) or leave a diffusion model's latents behind; a reused
    autoencoder refuses --autoencoder-lr; after --stage autoencoder is run again, --resume of stage 2 is refused
    (it learned the old latents and scale) and a fresh stage 2 trains. Refused runs change no file."""
    module = lesson_module("05")
    out = tmp_path / "out"
    stage1 = ["--data-dir", tiny_data_dir, "--out", out, "--autoencoder-width", 8, "--batch-size", 64, "--device", "cpu"]
    common = [*stage1, "--width", 8, "--steps", 4, "--num-samples", 2, "--timesteps", 40]  # 256 images: 4 steps/epoch

    def files():
        return {path.name: path.read_bytes() for path in out.iterdir()}

    def refused(argv, code, expected):
        before = files()
        got, lines = run_main(module, argv, capsys)
        assert got == code and len(lines) == 1 and expected in lines[0], (argv, lines)
        assert files() == before, argv

    assert run_main(module, ["--stage", "autoencoder", "--max-steps", 2, *stage1], capsys)[0] == 0
    refused(["--stage", "autoencoder", *stage1, "--steps", 4, "--interpolate"], 1,
            "--steps, --interpolate do nothing with --stage autoencoder")
    refused(["--stage", "autoencoder", *stage1, "--width", 16], 1, "--width does nothing with --stage autoencoder")
    code, lines = run_main(module, ["--stage", "autoencoder", *stage1, "--resume", "--autoencoder-epochs", 1], capsys)
    assert code == 0, lines
    assert load_checkpoint(out / "autoencoder.pt", module.AUTOENCODER_LESSON)["step"] == 4  # it acted: from step 2 to 4
    assert run_main(module, ["--max-steps", 2, *common], capsys)[0] == 0  # reuses the autoencoder of 4 steps
    refused([*common, "--resume", "--autoencoder-epochs", 2], 1, "learned the latents of")
    refused([*common, "--autoencoder-epochs", 2], 1, "was trained for 4 steps, not the --autoencoder-epochs 2 (8 steps)")
    refused([*common, "--max-steps", 2, "--autoencoder-epochs", 1], 2, "--max-steps and --autoencoder-epochs both")
    refused([*common, "--max-steps", 2, "--autoencoder-lr", 0.01], 1, "--autoencoder-lr does nothing when")
    assert run_main(module, ["--stage", "autoencoder", "--max-steps", 2, "--seed", 1, *stage1], capsys)[0] == 0
    refused(["--stage", "diffusion", "--resume", "--max-steps", 4, *common], 1,
            "learned the latents of another autoencoder than")
    code, lines = run_main(module, ["--stage", "diffusion", "--max-steps", 2, *common], capsys)
    assert code == 0, lines


def damaged_copies(folder, good):
    """Three damaged versions of the file `good` (bytes) under `folder`: cut short, overwritten with noise, and
    a file of another kind (a PNG picture): {kind: path}."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"{kind}{suffix}" for kind, suffix in
             (("truncated", ".bin"), ("noise", ".bin"), ("another-kind", ".bin"))}
    paths["truncated"].write_bytes(good[:len(good) * 2 // 3 - 1])  # (mid-row, for a text file)
    paths["noise"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    Image.new("L", (8, 8), 128).save(paths["another-kind"], format="PNG")
    return paths


def test_every_file_the_project_reads_damaged_gives_one_line_or_is_rebuilt(tmp_path, capsys, monkeypatch):
    """Issue 38, kind 4, for the files beyond checkpoints and --data-dir (tests/test_runtime.py and
    test_a_corrupt_data_dir_... cover those): a samples.npz read by utils.metrics or utils.visualize, a metrics.csv
    read by utils.visualize, a checkpoint given to compare_methods, edit_images or text_to_image, a picture given to
    edit_images: truncated, noise or a file of another kind, each is refused in one line (exit 1) that names the
    file. The caches, which the project wrote itself, are rebuilt instead: the classifier of utils.metrics and an
    image folder's decoded pictures."""
    import numpy as np

    from conftest import run_in_process
    from utils import data, metrics, visualize

    npz = tmp_path / "good.npz"
    np.savez(npz, images=np.zeros((8, 4, 4, 1), np.uint8))
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,loss,lr,images_per_s\n" + "".join(f"{50 * k},0.{k}5,1.000e-03,100.5\n" for k in (1, 2, 3)))
    checkpoint = tmp_path / "good.pt"
    torch.save({"format": 1, "lesson": "02_ddpm", "config": {}}, checkpoint)
    compare = load_lesson("examples/compare_methods.py")
    edit = load_lesson("examples/edit_images.py")
    text_to_image = load_lesson("examples/text_to_image.py")
    readers = {  # (main, prog, argv before the file, argv after it, a good file of the kind)
        "utils.metrics samples": (metrics.main, "metrics.py", [], ["--dataset", "mnist"], npz),
        "utils.visualize samples": (visualize.main, "visualize.py", ["samples", "--out", tmp_path / "fig"], [], npz),
        "utils.visualize loss": (visualize.main, "visualize.py", ["loss", "--out", tmp_path / "fig"], [], csv),
        "compare_methods": (compare.main, "compare_methods.py", ["--no-metrics", "--out", tmp_path / "c",
                                                                 "--device", "cpu", "--checkpoint"], [], checkpoint),
        "edit_images checkpoint": (edit.main, "edit_images.py", ["sdedit", "--out", tmp_path / "e", "--device", "cpu",
                                                                 "--checkpoint"], [], checkpoint),
        "text_to_image": (text_to_image.main, "text_to_image.py", ["--sample-only", "--out", tmp_path / "t",
                                                                   "--device", "cpu", "--checkpoint"], [], checkpoint),
    }
    for name, (main, prog, before, after, good) in readers.items():
        for kind, path in damaged_copies(tmp_path / name.replace(" ", "_"), good.read_bytes()).items():
            done = run_in_process(main, prog, *before, path, *after, capsys=capsys)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 1 and len(lines) == 1 and str(path) in lines[0], (name, kind, done.stderr)
    assert not any((tmp_path / folder).exists() for folder in ("fig", "c", "e", "t"))  # refused: nothing written
    for kind, path in damaged_copies(tmp_path / "pictures", npz.read_bytes()).items():
        if kind != "another-kind":  # (a PNG is a picture)
            with pytest.raises(data.LessonError, match="cannot be read as an image"):
                data.read_image(path, 8, 1)

    # The classifier cache: damaged, it is trained again (here a stand-in trainer) with a one-line note.
    cache = tmp_path / "cache"
    stand_in = metrics.Classifier(1, 28)
    monkeypatch.setattr(metrics, "train_classifier", lambda *args: (stand_in, 0.5, 1.0))
    metrics.load_classifier("mnist", tmp_path, cache)
    good = (cache / "classifier-mnist.pt").read_bytes()
    for kind, path in damaged_copies(tmp_path / "classifier", good).items():
        (cache / "classifier-mnist.pt").write_bytes(path.read_bytes())
        capsys.readouterr()
        model, accuracy = metrics.load_classifier("mnist", tmp_path, cache)
        notes = capsys.readouterr().err.strip().splitlines()
        assert accuracy == 0.5 and notes[0].startswith("note: the cached classifier cannot be used"), (kind, notes)
        assert load_checkpoint(cache / "classifier-mnist.pt", metrics.CLASSIFIER)["test_accuracy"] == 0.5

    # An image folder's cache of decoded pictures: damaged, it is decoded again.
    from test_image_folder import write_folder

    pictures = write_folder(tmp_path / "folder")
    first = data.load_image_folder(pictures, 16, 1, tmp_path / "data")
    (saved,) = (tmp_path / "data").rglob("*.pt")
    for kind, path in damaged_copies(tmp_path / "folder_cache", saved.read_bytes()).items():
        saved.write_bytes(path.read_bytes())
        again = data.load_image_folder(pictures, 16, 1, tmp_path / "data")
        assert torch.equal(again.images, first.images), kind
        assert torch.equal(data.load_image_folder(pictures, 16, 1, tmp_path / "data").images, first.images)


def test_a_slice_of_the_flag_fuzz_finds_no_traceback_trace_or_ignored_flag(capsys):
    """Issue 38: a fast slice of tests/fuzz_flags.py (one drawn run per lesson at T = 10; each that trains is
    continued, sampled, edited, compared or used by the capstone as its lesson allows, now and then drawn by
    utils.visualize, scored or followed by GETTING_STARTED; one drawn flag left out of each run that exits 0).
    Each outcome is one line or exit 0, a refused run leaves its folder as it found it, and no flag leaves every
    output the same without a note. The extended fuzz (`python tests/fuzz_flags.py --runs 30`) is run by hand."""
    import fuzz_flags

    counts, failures, _ = fuzz_flags.fuzz(fuzz_flags.parse_args(["--runs", "5", "--seed", "0", "--max-timesteps", "21",
                                                                 "--timesteps", "10", "--quiet"]))
    assert failures == [], "\n".join(failures)
    # the slice reaches both sides: runs that act (and flags left out of them) and runs that are refused
    assert counts["refused"] > 0 and counts["runs"] > counts["refused"] and counts["ablations"] > 0, counts


def _parsers(module, argv):
    """The argparse parser that module.parse_args(argv) builds, and its subcommands' parsers by name."""
    import argparse
    from unittest import mock

    built = []
    original = argparse.ArgumentParser.parse_args

    def keep(parser, *args, **kwargs):
        built.append(parser)
        return original(parser, *args, **kwargs)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", keep), pytest.raises(SystemExit):
        module.parse_args(argv)  # argv ends in --help: only the parser is wanted
    parser = built[0]
    subcommands = {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                   for name, sub in action.choices.items()}
    return parser, subcommands


def _flags(parser):
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def test_the_flag_fuzz_draws_every_flag_of_every_entry_point_or_says_why_not():
    """Issue 38: every flag of the five lessons, compare_methods, edit_images (each edit), text_to_image, each figure
    of utils.visualize, utils.metrics and GETTING_STARTED is drawn by tests/fuzz_flags.py with values to try, or
    named in its NOT_DRAWN with the reason (the fuzz sets it itself); and nothing is drawn that the entry point does
    not have. A flag added to an entry point fails here until the fuzz draws it."""
    import fuzz_flags
    from utils import metrics, visualize

    entries = {lesson: (load_lesson(lesson), ["--help"]) for lesson in fuzz_flags.FLAGS}
    entries.update({"compare": (load_lesson("examples/compare_methods.py"), ["--help"]),
                    "text": (load_lesson("examples/text_to_image.py"), ["--help"]),
                    "metrics": (metrics, ["--help"]), "getting_started": (load_lesson("GETTING_STARTED.py"), ["--help"])})
    checked = []
    for entry, (module, argv) in entries.items():
        checked.append((entry, _flags(_parsers(module, argv)[0])))
    for edit, parser in _parsers(load_lesson("examples/edit_images.py"), ["--help"])[1].items():
        checked.append((edit, _flags(parser)))
    for figure, parser in _parsers(visualize, ["--help"])[1].items():
        checked.append((f"figure:{figure}", _flags(parser)))
    assert {entry for entry, _ in checked} >= {*fuzz_flags.EDITS, *(f"figure:{name}" for name in fuzz_flags.FIGURES)}
    for entry, flags in checked:
        drawn = set(fuzz_flags.flags_of(entry))
        assert flags - drawn - set(fuzz_flags.NOT_DRAWN) == set(), f"{entry}: flags neither drawn nor in NOT_DRAWN"
        assert drawn - flags == set(), f"{entry}: the fuzz draws flags it does not have"
