"""A folder of a learner's own pictures as --dataset, in every lesson. The tests make their folders: PNG and JPEG of mixed
sizes, grayscale and RGB (and RGBA), one corrupt file, one text file, class subfolders or none."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_refused, load_lesson, run_in_process
from utils import data

NET = ["--width", "8", "--channel-mults", "1,2", "--batch-size", "4", "--num-samples", "2", "--timesteps", "25"]
LESSONS = {  # file, tiny flags for a two-step run
    "01": ("01_ddpm_toy.py", ["--width", "8", "--batch-size", "4", "--num-samples", "2", "--timesteps", "25"]),
    "02": ("02_ddpm.py", [*NET, "--warmup-steps", "1"]),
    "03": ("03_conditional_ddpm.py", [*NET, "--warmup-steps", "1"]),
    "04": ("04_ddim_fast_sampling.py", [*NET, "--steps", "3"]),
    "05": ("05_latent_diffusion.py", ["--autoencoder-width", "4", "--width", "4", "--batch-size", "4", "--steps", "3",
                                      "--num-samples", "2", "--timesteps", "25"]),
}
_loaded = {}


def lesson(key):
    if key not in _loaded:
        _loaded[key] = load_lesson(LESSONS[key][0])
    return _loaded[key]


def picture(rng, height, width, mode):
    """A random picture: a bright square on a dark ground, in PIL mode L, RGB or RGBA."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 60, (height, width, channels), dtype=np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    array[top:top + height // 2, left:left + width // 2, :min(channels, 3)] = 230
    if channels == 4:
        array[..., 3] = 255
        array[: height // 4, :, 3] = 0  # a transparent band, shown white
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def write_folder(root, classes=("cats", "dogs"), per_class=6, mode_of=lambda i: ("RGB", "L")[i % 2], seed=0):
    """Class subfolders (or a flat folder with classes=()) of PNG and JPEG files of mixed sizes, plus a corrupt
    .png and a notes.txt that must be ignored."""
    rng = np.random.default_rng(seed)
    folders = [root / name for name in classes] or [root]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = picture(rng, 20 + 7 * i, 24 + 5 * (i % 3), mode_of(i))
            image.save(folder / f"{i}.png") if i % 3 else image.convert("RGB" if image.mode == "RGBA" else
                                                                       image.mode).save(folder / f"{i}.jpg")
    (folders[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (folders[-1] / "notes.txt").write_text("not an image")
    return root


def shown_lines(stderr):
    """The lines a terminal shows: what follows each line's last carriage return (progress bars erase themselves)."""
    return [line.split("\r")[-1] for line in stderr.split("\n") if line.split("\r")[-1].strip()]


def snapshot(folder):
    return sorted((path.relative_to(folder), path.stat().st_mtime_ns) for path in folder.rglob("*"))


def test_a_folder_is_read_resized_scaled_and_labelled_by_subfolder(tmp_path, capsys):
    folder = write_folder(tmp_path / "pictures")
    before = snapshot(folder)
    dataset = data.load_image_folder(folder, 16, None, tmp_path / "cache")
    printed = capsys.readouterr().out
    assert dataset.images.shape == (12, 3, 16, 16) and dataset.images.dtype == torch.float32
    assert -1.0 <= dataset.images.min() and dataset.images.max() <= 1.0 and dataset.images.max() > 0.7
    assert dataset.labels.tolist() == [0] * 6 + [1] * 6 and dataset.classes == ("cats", "dogs")
    assert "skipped 1 unreadable file(s) of 13" in printed and "broken.png" in printed and "notes.txt" not in printed
    assert snapshot(folder) == before  # nothing written into the learner's folder
    gray = data.load_image_folder(folder, 12, 1, tmp_path / "cache")
    assert gray.images.shape == (12, 1, 12, 12)
    # A folder of grayscale pictures only is read with one channel unless told otherwise.
    only_gray = write_folder(tmp_path / "gray", mode_of=lambda i: "L")
    assert data.load_image_folder(only_gray, 8, None, tmp_path / "cache").images.shape[1] == 1
    assert data.load_image_folder(only_gray, 8, 3, tmp_path / "cache").images.shape[1] == 3


def test_resizing_keeps_the_centre_and_transparency_becomes_white(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # a white centre third: the centre crop of a 10 x 10 square is all white
    Image.fromarray(wide).save(folder / "wide.png")
    clear = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black: shown white
    Image.fromarray(clear, "RGBA").save(folder / "clear.png")
    dataset = data.load_image_folder(folder, 10, 3, tmp_path / "cache")
    assert dataset.classes == () and dataset.labels.tolist() == [0, 0]
    assert torch.allclose(dataset.images, torch.ones_like(dataset.images))


def test_the_cache_is_reused_then_rebuilt_when_a_file_or_a_setting_changes(tmp_path, capsys, monkeypatch):
    folder = write_folder(tmp_path / "pictures")
    first = data.load_image_folder(folder, 16, None, tmp_path / "cache")
    assert "decoded 12 images" in capsys.readouterr().out
    decoded = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *arguments: decoded.append(1) or real_decode(*arguments))
    again = data.load_image_folder(folder, 16, None, tmp_path / "cache")
    assert not decoded and "read from the cache" in capsys.readouterr().out
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    # A changed file (new bytes and time) is never served stale.
    picture(np.random.default_rng(9), 30, 30, "RGB").save(folder / "cats" / "1.png")
    os.utime(folder / "cats" / "1.png", ns=(10**18, 10**18))
    changed = data.load_image_folder(folder, 16, None, tmp_path / "cache")
    assert decoded and "decoded 12 images" in capsys.readouterr().out
    assert not torch.equal(changed.images, first.images)
    decoded.clear()
    (folder / "dogs" / "1.png").unlink()  # a removed file, and another size: rebuilt too
    assert len(data.load_image_folder(folder, 16, None, tmp_path / "cache").images) == 11 and decoded
    decoded.clear()
    assert data.load_image_folder(folder, 8, None, tmp_path / "cache").images.shape[-1] == 8 and decoded


def test_bad_folders_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(data.LessonError, match="is not a folder"):
        data.load_image_folder(tmp_path / "missing", 16, None, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.LessonError, match="holds no image files"):
        data.load_image_folder(tmp_path / "empty", 16, None, tmp_path / "cache")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"nothing")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"nothing either")
    with pytest.raises(data.LessonError, match="none of its 2 image files could be read"):
        data.load_image_folder(tmp_path / "bad", 16, None, tmp_path / "cache")
    folder = write_folder(tmp_path / "pictures")
    with pytest.raises(data.LessonError, match="would be written into .*, the image folder"):
        data.load_image_folder(folder, 16, None, folder / "data")
    module = lesson("02")
    capsys.readouterr()
    assert_refused(module.parse_args, ["--dataset", tmp_path / "nowhere"], "is neither a dataset", capsys)
    assert_refused(module.parse_args, ["--image-size", "16"], "apply to a folder of pictures", capsys)
    assert_refused(module.parse_args, ["--dataset", "mnist", "--channels", "3"], "apply to a folder of pictures", capsys)
    assert_refused(module.parse_args, ["--dataset", folder, "--image-size", "18", "--channel-mults", "1,2,4"],
                   "cannot be halved 2 times", capsys)
    assert_refused(module.parse_args, ["--dataset", folder, "--channels", "2"], "invalid choice", capsys)
    assert_refused(lesson("01").parse_args, ["--dataset", folder, "--image-size", "30"], "multiple of 4", capsys)
    assert_refused(lesson("05").parse_args, ["--dataset", folder, "--image-size", "30"], "multiple of 4", capsys)


@pytest.mark.parametrize("key", list(LESSONS))
def test_every_lesson_trains_on_a_folder_and_samples(key, tmp_path, capsys):
    """Two training steps on a folder of class subfolders, then samples of the folder's size and channels;
    --resume and --sample-only refuse another size in one line; nothing is written into the folder."""
    folder = write_folder(tmp_path / "pictures")
    before = snapshot(folder)
    module, tiny = lesson(key), LESSONS[key][1]
    out = tmp_path / "out"
    common = ["--dataset", folder, "--image-size", "16", "--data-dir", tmp_path / "data", "--device", "cpu"]
    result = run_in_process(module.main, LESSONS[key][0], "--out", out, "--max-steps", "2", *common, *tiny,
                            capsys=capsys)
    assert result.returncode == 0, result.stderr
    images = np.load(out / "samples.npz")["images"]
    assert images.shape[1:] == (16, 16, 3) and images.dtype == np.uint8, images.shape
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert config["dataset"] == data.FOLDER_DATASET and config["classes"] == ["cats", "dogs"]
    assert config["image_size"] == 16 and config["channels"] == 3
    refused = run_in_process(module.main, LESSONS[key][0], "--out", out, "--resume", "--max-steps", "3",
                             *common[:2], "--image-size", "8", *common[4:], *tiny, capsys=capsys)
    assert refused.returncode == 1 and len(shown_lines(refused.stderr)) == 1, refused.stderr
    assert "image_size=16, this run has image_size=8" in refused.stderr
    sample_only = ["--sample-only", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path / "sampled"]
    if key == "04":
        sample_only += ["--steps", "3"]
    refused = run_in_process(module.main, LESSONS[key][0], *sample_only, "--dataset", folder, "--image-size", "8",
                             capsys=capsys)
    assert refused.returncode == 1 and "image_size=16, this run asks for image_size=8" in refused.stderr, refused.stderr
    assert snapshot(folder) == before


def test_lesson03_conditions_on_the_subfolders_and_shows_their_names(tmp_path, capsys, monkeypatch):
    module = lesson("03")
    folder = write_folder(tmp_path / "pictures", classes=("apples", "pears", "plums"))
    shown = []
    real = module.visualize.save_labeled_grid
    monkeypatch.setattr(module.visualize, "save_labeled_grid",
                        lambda images, rows, columns, *rest, **kw: shown.append(columns) or real(
                            images, rows, columns, *rest, **kw))
    out = tmp_path / "out"
    module.main(["--dataset", str(folder), "--image-size", "8", "--data-dir", str(tmp_path / "data"),
                 "--out", str(out), "--max-steps", "2", *LESSONS["03"][1], "--num-samples", "6"])
    assert np.load(out / "samples.npz")["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert shown == [["apples", "pears", "plums"]]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["num_classes"] == 3
    result = run_in_process(module.main, "03_conditional_ddpm.py", "--sample-only", "--checkpoint",
                            out / "checkpoint.pt", "--out", tmp_path / "s", "--class-label", "3", capsys=capsys)
    assert result.returncode == 1 and "--class-label must be between 0 and 2, got 3" in result.stderr
    flat = write_folder(tmp_path / "flat", classes=())
    result = run_in_process(module.main, "03_conditional_ddpm.py", "--dataset", flat, "--data-dir",
                            tmp_path / "data", "--out", tmp_path / "o", "--max-steps", "1", capsys=capsys)
    assert result.returncode == 1 and "lesson 03 learns classes" in result.stderr
    assert len(shown_lines(result.stderr)) == 1, result.stderr


def test_compare_methods_times_a_folder_checkpoint_and_refuses_to_score_it(tmp_path, capsys):
    """utils.metrics knows only the built-in datasets: on an image-folder checkpoint compare_methods says so in one
    line before sampling, and with --no-metrics it times and draws the samplers."""
    folder = write_folder(tmp_path / "pictures")
    out = tmp_path / "l02"
    lesson("02").main(["--dataset", str(folder), "--image-size", "8", "--data-dir", str(tmp_path / "data"),
                       "--out", str(out), "--max-steps", "2", *LESSONS["02"][1]])
    compare = load_lesson("examples/compare_methods.py")
    common = ["--checkpoint", out / "checkpoint.pt", "--steps", "2", "--num-samples", "2", "--ddpm-samples", "2",
              "--out", tmp_path / "compare"]
    refused = run_in_process(compare.main, "compare_methods.py", *common, capsys=capsys)
    assert refused.returncode == 1 and "pass --no-metrics" in refused.stderr
    assert len(shown_lines(refused.stderr)) == 1 and not (tmp_path / "compare" / "compare.csv").exists()
    timed = run_in_process(compare.main, "compare_methods.py", *common, "--no-metrics", capsys=capsys)
    assert timed.returncode == 0, timed.stderr
    assert (tmp_path / "compare" / "compare.png").stat().st_size > 0
    from utils import metrics
    with pytest.raises(data.LessonError, match="scores only"):
        metrics.evaluate(np.zeros((2, 8, 8, 3), dtype=np.uint8), data.FOLDER_DATASET)


def test_a_16_bit_grayscale_png_is_read_as_a_viewer_shows_it(tmp_path):
    """Pillow's convert() clips 16-bit levels at 255 (a 0..65535 ramp came out 99 % white); read_image scales
    65535 to white, so the ramp's mean is mid-grey and its ends black and white."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")  # Pillow really reads it as 16-bit
    levels = data.read_image(tmp_path / "ramp16.png", 64, 1).add(1).mul(127.5)
    assert levels.mean().item() == pytest.approx(127.5, abs=0.6)
    assert levels.min().item() < 1 and levels.max().item() > 254
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "ramp8.png")  # the same picture in 8 bits
    assert (data.read_image(tmp_path / "ramp8.png", 64, 1) - data.read_image(tmp_path / "ramp16.png", 64, 1)).abs() \
        .max().item() <= 2 / 127.5


def test_subfolders_without_a_readable_picture_are_not_classes(tmp_path, capsys):
    """An archive's __MACOSX (AppleDouble '._' files named .png) and an empty folder are no classes: the real
    classes keep their numbers, in the listing (what checkpoints compare) and in the decoded labels."""
    folder = write_folder(tmp_path / "pets", classes=("cats", "dogs"))
    (folder / "__MACOSX" / "cats").mkdir(parents=True)
    for name in ("._0.png", "._1.png"):
        (folder / "__MACOSX" / "cats" / name).write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder / "empty").mkdir()
    assert data.folder_files(folder)[1] == ("cats", "dogs")
    dataset = data.load_image_folder(folder, 16, None, tmp_path / "cache")
    assert dataset.classes == ("cats", "dogs") and sorted(dataset.labels.unique().tolist()) == [0, 1]
    assert f"note: {folder / '__MACOSX'} holds no picture that can be read; it is not a class" in capsys.readouterr().out


def test_lesson04_trains_and_draws_every_figure_on_a_folder_of_fewer_pictures_than_its_figures_show(tmp_path, capsys):
    """inversion.png shows 8 training pictures; a folder of 5 draws 5 columns instead of crashing."""
    folder = write_folder(tmp_path / "few", classes=(), per_class=5)
    out = tmp_path / "out"
    result = run_in_process(lesson("04").main, "04_ddim_fast_sampling.py", "--dataset", folder, "--data-dir",
                            tmp_path / "cache", "--out", out, "--image-size", "16", "--batch-size", "4",
                            "--max-steps", "2", "--width", "8", "--channel-mults", "1,2", "--num-samples", "2",
                            "--timesteps", "25", "--steps", "5", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert Image.open(out / "inversion.png").size[0] > 0 and (out / "samples.png").is_file()
