"""Pictures: the files exist, have the right size, and show the images given."""
import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from utils import visualize


def test_to_uint8_maps_the_range_ends_and_layout():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = visualize.to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 1)
    assert out.ravel().tolist() == [0, 128, 255, 255]


def test_grid_png_holds_every_image(tmp_path):
    images = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 28, 28)
    path = visualize.save_grid(images, tmp_path / "grid.png", nrow=3)
    picture = imageio.imread(path)
    scale = visualize.DISPLAY_SCALE
    assert picture.shape == (scale * (2 * 30 + 2), scale * (3 * 30 + 2), 3)
    # the centre pixel of each cell is that image's value
    centres = [picture[scale * (2 + 30 * row + 14), scale * (2 + 30 * col + 14), 0] for row in range(2) for col in range(3)]
    assert centres == [round((v + 1) * 127.5) for v in torch.linspace(-1, 1, 6).tolist()]


def cell_values(picture, rows, columns, size=28):
    """The centre pixel of each grid cell (the value of the image drawn there), row by row."""
    scale = visualize.DISPLAY_SCALE
    return [[int(picture[scale * (2 + (size + 2) * row + size // 2), scale * (2 + (size + 2) * col + size // 2), 0])
             for col in range(columns)] for row in range(rows)]


def test_samples_png_shows_the_first_64_and_says_so(tmp_path, capsys):
    """1000 samples: samples.png is the 8 x 8 grid of the first 64, in order, and one line says where the rest are."""
    values = torch.linspace(-1, 1, 1000)
    images = values.view(-1, 1, 1, 1).expand(-1, 1, 28, 28)
    picture = imageio.imread(visualize.save_samples_grid(images, tmp_path / "samples.png"))
    scale = visualize.DISPLAY_SCALE
    assert picture.shape == (scale * (8 * 30 + 2), scale * (8 * 30 + 2), 3)
    expected = visualize.to_uint8(images[:64])[:, 0, 0, 0].reshape(8, 8).tolist()
    assert cell_values(picture, 8, 8) == expected
    assert capsys.readouterr().out == "samples.png shows 64 of the 1000 samples; all are in samples.npz\n"
    visualize.save_samples_grid(images[:64], tmp_path / "all.png")  # 64 or fewer: all of them, nothing said
    assert capsys.readouterr().out == ""


def test_samples_png_of_a_conditional_run_has_one_row_per_class(tmp_path, capsys):
    """256 samples of 10 classes in turn: one row per class, each its class's first 6 (60 <= 64); a class with
    fewer samples than the others is padded with white."""
    labels = torch.arange(256) * 10 // 256
    labels[labels == 9] = torch.tensor([9] * 5 + [8] * (int((labels == 9).sum()) - 5))  # class 9: only 5 samples
    values = torch.linspace(-1, 0.9, 256)
    images = values.view(-1, 1, 1, 1).expand(-1, 1, 28, 28)
    picture = imageio.imread(visualize.save_samples_grid(images, tmp_path / "samples.png", labels=labels))
    cells = cell_values(picture, 10, 6)
    pixels = visualize.to_uint8(images)[:, 0, 0, 0]
    for label in range(9):
        assert cells[label] == pixels[labels == label][:6].tolist()
    assert cells[9] == pixels[labels == 9].tolist() + [255]
    assert "shows 60 of the 256 samples" in capsys.readouterr().out
    # one class asked for (--class-label): the first 64 in a square grid, as for an unconditional run
    picture = imageio.imread(visualize.save_samples_grid(images, tmp_path / "one.png", labels=torch.zeros(256)))
    assert picture.shape[:2] == imageio.imread(visualize.save_samples_grid(images, tmp_path / "u.png")).shape[:2]


def test_sample_rows_set_runs_side_by_side_and_refuse_a_wrong_file(tmp_path):
    from utils.runtime import LessonError

    gray = visualize.save_samples_npz(torch.full((10, 1, 28, 28), -1.0), tmp_path / "gray.npz")
    colour = visualize.save_samples_npz(torch.full((10, 3, 32, 32), 1.0), tmp_path / "colour.npz")
    path = visualize.save_sample_rows([gray, colour], ["gray", "colour"], tmp_path / "rows.png", count=8)
    picture = imageio.imread(path)
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0]  # two rows of eight: wider than tall
    dark, light = (picture[..., :3] < 40).sum(), (picture[..., :3] > 215).sum()
    assert dark > 0 and light > 0  # both rows drawn
    ramp = visualize.save_samples_npz(torch.linspace(-1, 1, 60).view(60, 1, 1, 1).expand(60, 1, 28, 28),
                                      tmp_path / "ramp.npz")
    strided = imageio.imread(visualize.save_sample_rows([ramp], ["ramp"], tmp_path / "s.png", count=10, stride=6))
    plain = imageio.imread(visualize.save_sample_rows([ramp], ["ramp"], tmp_path / "p.png", count=10))
    assert strided.shape == plain.shape and strided[..., :3].mean() > plain[..., :3].mean()  # 0, 6, ..., 54: lighter
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(LessonError, match="is not a lesson's samples.npz"):
        visualize.save_sample_rows([tmp_path / "other.npz"], ["x"], tmp_path / "bad.png")
    with pytest.raises(LessonError, match="holds 10 images"):
        visualize.save_sample_rows([gray], ["gray"], tmp_path / "bad.png", count=12)


def test_npz_keeps_uint8_nhwc_and_labels(tmp_path):
    path = visualize.save_samples_npz(torch.zeros(5, 3, 8, 8), tmp_path / "s.npz", labels=torch.arange(5))
    loaded = np.load(path)
    assert loaded["images"].shape == (5, 8, 8, 3) and loaded["images"].dtype == np.uint8
    assert loaded["labels"].tolist() == [0, 1, 2, 3, 4]


def test_denoising_gif_and_strip(tmp_path):
    frames = [torch.full((4, 1, 28, 28), value) for value in (-1.0, 0.0, 1.0)]
    path = visualize.save_denoising_gif(frames, tmp_path / "d.gif")
    gif = imageio.mimread(path)
    assert len(gif) == 3
    assert gif[0].mean() < gif[1].mean() < gif[-1].mean()
    from PIL import Image

    durations = []
    with Image.open(path) as animation:  # what a browser plays: 80 ms per frame, the last held 1.5 s
        for index in range(animation.n_frames):
            animation.seek(index)
            durations.append(animation.info["duration"])
        assert animation.info.get("loop") == 0
    assert durations == [80, 80, 1500]
    strip = imageio.imread(visualize.save_denoising_strip(frames, [999, 500, 0], tmp_path / "d.png", rows=2))
    assert strip.ndim == 3 and strip.shape[1] > strip.shape[0]


def test_loss_curve_from_metrics_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,loss,lr,images_per_s\n50,0.2,1e-3,600\n100,0.1,1e-3,610\n")
    picture = imageio.imread(visualize.save_loss_curve(csv_path, tmp_path / "loss.png"))
    assert picture.shape[0] > 100 and picture.shape[1] > 100


def test_loss_curves_are_labelled_by_run_and_by_file_when_runs_share_a_folder():
    assert visualize.curve_labels(["a/01_ddpm_toy/metrics.csv", "b/02_ddpm/metrics.csv"]) == ["01_ddpm_toy", "02_ddpm"]
    assert visualize.curve_labels(["05/metrics.csv", "05/autoencoder_metrics.csv"]) == [
        "05/metrics.csv", "05/autoencoder_metrics.csv"]


def test_labeled_grid_has_a_cell_per_image(tmp_path):
    images = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 28, 28).contiguous()
    path = visualize.save_labeled_grid(images, ["w = 0", "w = 1"], ["a", "b", "c"], tmp_path / "g.png",
                                       row_title="guidance", column_title="class")
    picture = imageio.imread(path)
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0]  # 3 columns wider than 2 rows
    # The darkest (-1) and brightest (+1) images both made it into the figure.
    assert picture[..., :3].min() < 30 and picture[..., :3].max() > 225
    with pytest.raises(ValueError):
        visualize.save_labeled_grid(images, ["one row"], ["a", "b"], tmp_path / "bad.png")


# --- the forward and reverse processes, schedules, the command line ---

def test_forward_steps_cover_clean_to_pure_noise():
    assert visualize.forward_steps(1000) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]


def test_strip_and_gif_steps_follow_T():
    assert visualize.strip_steps(1000) == [999, 800, 600, 400, 300, 200, 100, 50, 0]  # the lessons' strip at T = 1000
    for T in (2, 5, 25, 50, 2000):
        strip, gif = visualize.strip_steps(T), visualize.gif_steps(T, 40)
        assert strip[0] == T - 1 and strip[-1] == 0 and strip == sorted(set(strip), reverse=True), (T, strip)
        assert gif[0] == T - 1 and gif[-1] == 0 and gif == sorted(set(gif), reverse=True), (T, gif)
        assert len(gif) <= min(T, 41)  # about 40 frames, at most one per step
    assert visualize.gif_steps(25, 40) == list(range(24, -1, -1))


def test_figure_schedules_are_the_lessons_schedules(lesson01):
    from conftest import load_lesson

    lesson02 = load_lesson("02_ddpm.py")
    assert torch.allclose(visualize.schedule_betas("linear").float(), lesson01.make_schedule("cpu")["betas"])
    for name in ("linear", "cosine"):
        assert torch.allclose(visualize.schedule_betas(name).float(), lesson02.make_schedule(name, "cpu")["betas"])
    with pytest.raises(ValueError):
        visualize.schedule_betas("sigmoid")


def test_schedule_figure(tmp_path):
    path = visualize.save_schedules({name: visualize.schedule_betas(name) for name in ("linear", "cosine")},
                                    tmp_path / "s.png")
    picture = imageio.imread(path)
    assert picture.shape[1] > 2 * picture.shape[0]  # three panels side by side


def test_reverse_figure_has_two_rows_per_image(tmp_path):
    steps = [999, 500, 0]
    xs = [torch.full((2, 1, 28, 28), -1.0)] * 3
    x0s = [torch.full((2, 1, 28, 28), 1.0)] * 3
    picture = imageio.imread(visualize.save_reverse_process(xs, x0s, steps, tmp_path / "r.png", rows=2))
    assert picture[..., :3].min() < 30 and picture[..., :3].max() > 225  # both rows made it in
    forward = imageio.imread(visualize.save_forward_process(xs, steps, tmp_path / "f.png"))
    assert forward.shape[1] > forward.shape[0]


def test_ideal_denoiser_is_bayes_rule_over_the_reference_set():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand((5, 1, 4, 4), generator=generator) * 2 - 1
    x_t = torch.randn((3, 1, 4, 4), generator=generator)
    alpha_bar = 0.3
    # Brute force: posterior weight of each reference image from the Gaussian density of DDPM Eq. 4.
    squared = ((x_t[:, None] - alpha_bar ** 0.5 * reference[None]) ** 2).flatten(2).sum(2)
    weights = torch.softmax(-squared / (2 * (1 - alpha_bar)), dim=1)
    expected = torch.einsum("nm,mchw->nchw", weights, reference)
    assert torch.allclose(visualize.ideal_x0(x_t, alpha_bar, reference), expected, atol=1e-5)
    # Nearly clean: the nearest reference image; a single reference image: always that image.
    assert torch.allclose(visualize.ideal_x0(reference[[2]] * 0.9999 ** 0.5, 0.9999, reference), reference[[2]],
                          atol=1e-4)
    assert torch.allclose(visualize.ideal_x0(x_t, 0.01, reference[[1]]), reference[[1]].expand(3, -1, -1, -1))


def test_ideal_reverse_process_ends_on_a_reference_image():
    generator = torch.Generator().manual_seed(1)
    reference = torch.rand((3, 1, 6, 6), generator=generator) * 2 - 1
    betas = visualize.schedule_betas("linear", T=200) * 5  # 200 steps to the same noise level: a shorter test
    keep = {199, 100, 0}
    xs, x0s, final = visualize.ideal_reverse(reference, 4, betas, generator, keep)
    assert set(xs) == set(x0s) == keep
    distances = torch.cdist(final.flatten(1), reference.flatten(1)).min(dim=1).values
    assert distances.max() < 0.05  # the exact denoiser of a finite set can only rebuild its images
    assert torch.cdist(xs[199].flatten(1), reference.flatten(1)).min() > 2  # while it starts far from them, in noise


def test_denoiser_helpers_keep_the_device_and_dtype_of_their_inputs():
    """No CPU or float64 tensor may meet an accelerator's (Apple's MPS has no float64). noised, ideal_x0 and
    ideal_reverse run on the meta device, a stand-in for CUDA or MPS: an operation that mixed in a CPU tensor
    would raise, and every tensor an operation returns is recorded."""
    from torch.overrides import TorchFunctionMode

    class Recorder(TorchFunctionMode):
        on_device = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.device.type == "meta":
                self.on_device.add(result.dtype)
            return result

    reference = torch.randn(3, 1, 6, 6, device="meta")
    betas = visualize.schedule_betas("linear", T=20)  # the schedule itself is CPU float64 turned into floats
    with Recorder() as recorder:
        x_t = visualize.noised(reference, 0.5, torch.randn_like(reference))
        x0_pred = visualize.ideal_x0(x_t, 0.5, reference)
        xs, x0s, final = visualize.ideal_reverse(reference, 2, betas, torch.Generator().manual_seed(0), {19, 0})
    for result in (x_t, x0_pred, final, *xs.values(), *x0s.values()):
        assert result.device.type == "meta" and result.dtype == torch.float32
    assert recorder.on_device == {torch.float32}, recorder.on_device


def test_command_line_draws_each_figure(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "figures"
    metrics = tmp_path / "run" / "metrics.csv"
    metrics.parent.mkdir()
    metrics.write_text("step,loss,lr,images_per_s\n50,0.2,1e-3,600\n100,0.1,1e-3,610\n")
    commands = [["schedules"], ["forward", "--dataset", "mnist", "--schedule", "cosine"],
                ["reverse", "--dataset", "mnist", "--count", "2", "--reference", "32"], ["loss", str(metrics)]]
    for command, files in zip(commands, [["schedules.png"], ["forward_cosine.png"],
                                         ["reverse_linear.png", "reverse_linear.gif"], ["loss.png"]]):
        visualize.main([command[0], "--data-dir", str(tiny_data_dir), "--out", str(out), *command[1:]]
                       if command[0] in ("forward", "reverse") else [command[0], "--out", str(out), *command[1:]])
        printed = capsys.readouterr().out
        for name in files:
            assert imageio.imread(out / name).size > 0 and f"wrote {out / name}" in printed
    assert len(imageio.mimread(out / "reverse_linear.gif")) == 41  # t = 999, 974, ..., 24, then 0
    # without --reference the ideal denoiser knows 2000 images, or all of a smaller dataset (256 here); a --count or
    # --reference the user gives above the dataset's images is refused, not cut to them (issue 38)
    visualize.main(["reverse", "--dataset", "mnist", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "r"),
                    "--count", "1"])
    assert (tmp_path / "r" / "reverse_linear.png").is_file()
    capsys.readouterr()
    for figure, flag in (("reverse", "--reference"), ("reverse", "--count"), ("forward", "--count")):
        with pytest.raises(SystemExit) as exit_info:  # as `python -m utils.visualize` runs it
            visualize.run(lambda: visualize.main([figure, "--dataset", "mnist", "--data-dir", str(tiny_data_dir),
                                                  "--out", str(tmp_path / "none"), flag, "257"]))
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == f"error: {flag} 257 is more than the 256 images of mnist\n"
    assert not (tmp_path / "none").exists()


def test_command_line_refuses_bad_input(tmp_path, capsys):
    from conftest import assert_refused

    assert_refused(visualize.parse_args, ["forward", "--count", "0"], "--count", capsys)
    assert_refused(visualize.parse_args, ["drift"], "invalid choice", capsys)
    bad = tmp_path / "notes.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(visualize.LessonError, match="not a lesson's metrics.csv"):
        visualize.main(["loss", str(bad), "--out", str(tmp_path)])
    with pytest.raises(visualize.LessonError, match="no metrics file"):
        visualize.main(["loss", str(tmp_path / "missing.csv"), "--out", str(tmp_path)])
    assert not (tmp_path / "loss.png").exists()


def test_attention_maps_show_the_picture_and_one_map_per_word_also_for_the_empty_prompt(tmp_path):
    """The capstone's attention.png: 1 + len(words) panels side by side; the empty prompt (no words) used to
    crash (a lone matplotlib Axes is not a list; found by tests/fuzz_flags.py) and now draws the picture alone."""
    image = torch.linspace(-1, 1, 28 * 56).view(1, 28, 56)
    widths = []
    for words in (["a", "bag", "left"], []):
        path = visualize.save_attention_maps(image, torch.rand(len(words), 28, 56), words, tmp_path / "a.png")
        widths.append(imageio.imread(path).shape[1])
    assert widths[0] == round(1.9 * 4 * 100) and widths[1] == round(1.9 * 100), widths
