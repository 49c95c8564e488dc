"""examples/edit_images.py: SDEdit, inpainting and class translation, checked with exact denoisers whose right
answers are known (utils.visualize.ideal_x0: the best possible denoiser of a finite set of images), and from the
command line on tiny checkpoints."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_lesson, run_in_process
from utils.visualize import ideal_x0


@pytest.fixture(scope="module")
def edit():
    return load_lesson("examples/edit_images.py")


def exact_denoiser(reference):
    """denoiser(x_t, t, alpha_bar_t) -> (eps_pred, x0_pred) for data that are exactly the `reference` images."""
    def denoiser(x_t, t, alpha_bar_t):
        x0_pred = ideal_x0(x_t, alpha_bar_t, reference)
        return (x_t - math.sqrt(alpha_bar_t) * x0_pred) / math.sqrt(1 - alpha_bar_t), x0_pred
    return denoiser


def nearest(images, reference):
    """Index of the nearest reference image [N] and the distance to it (RMS per pixel)."""
    distances = torch.cdist(images.flatten(1), reference.flatten(1)) / math.sqrt(reference[0].numel())
    return distances.argmin(1), distances.min(1).values


def references(count=6, seed=0):
    return torch.rand((count, 1, 8, 8), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sdedit_at_strength_one_is_ordinary_sampling(edit):
    """At strength 1, SDEdit starts at t = T - 1 and takes lesson 04's DDIM steps: the same images as lesson 04's
    sample() from the noised input, to the bit."""
    lesson04 = edit.lesson04
    torch.manual_seed(0)
    model = lesson04.UNet(1, 8, (1, 2), 1).eval()
    alpha_bars = lesson04.make_schedule("cosine", "cpu", 25)["alpha_bars"]
    x0, noise = references(3), torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    denoiser = lambda x_t, t, alpha_bar_t: lesson04.predict_eps_and_x0(model, x_t, t, alpha_bar_t, "eps", True)
    edited = edit.sdedit(denoiser, alpha_bars, x0, 1.0, 10, 0.0, noise)
    x_T = edit.visualize.noised(x0, alpha_bars[-1].item(), noise)
    sampled, _ = lesson04.sample(model, alpha_bars, x_T, 10, "ddim", 0.0, "trailing", "eps", True)
    assert torch.equal(edited, sampled)
    assert edit.start_timestep(1.0, 1000) == 999 and edit.start_timestep(0.5, 1000) == 499
    with pytest.raises(ValueError, match="strength must lie in"):
        edit.start_timestep(0.0, 1000)


def test_sdedit_keeps_the_input_at_low_strength_and_draws_from_the_data_at_strength_one(edit):
    """The paper's trade-off, with the exact denoiser of six images of which the input is one: at strength 0.1
    the edit is the input; at strength 1 each edit is one of the six (realistic), and they are not all the input."""
    reference = references()
    alpha_bars = edit.lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    x0 = reference[[2]].expand(16, -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    low = edit.sdedit(exact_denoiser(reference), alpha_bars, x0, 0.1, 50, 0.0, noise)
    assert (low - x0).abs().max() < 0.01
    high = edit.sdedit(exact_denoiser(reference), alpha_bars, x0, 1.0, 50, 0.0, noise)
    index, distance = nearest(high, reference)
    assert distance.max() < 0.01 and len(set(index.tolist())) >= 3, index.tolist()


@pytest.mark.parametrize("resample", [1, 3])
def test_inpainting_keeps_the_known_pixels_exactly_and_fills_the_hole_from_the_data(edit, resample):
    reference = references()
    alpha_bars = edit.lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    x0 = reference[[4]].expand(8, -1, -1, -1)
    generator = torch.Generator().manual_seed(0)
    hole = edit.make_hole("left", 8, 8, generator)
    noise = torch.randn(x0.shape, generator=generator)
    filled = edit.inpaint(exact_denoiser(reference), alpha_bars, x0, hole, 50, 1.0, noise, generator, resample)
    assert torch.equal(filled[~hole.expand_as(filled)], x0[~hole.expand_as(x0)])  # exactly, not approximately
    assert (filled - x0).abs().max() < 0.01  # the kept half tells which image it is: the hole is that image's


def test_class_translation_moves_the_prediction_to_the_target_class(edit):
    """Lesson 03's guided prediction over an exact class-conditional denoiser (classes 0 and 1, four images each,
    the null class: all eight). An image of class 0 edited towards class 1 ends on a class-1 image, the nearest-
    image classifier's answer moving from 0 to 1; the same edit towards class 0 keeps it."""
    reference, labels = references(8, seed=5), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])

    class ExactConditional:
        null_class = 2

        def __call__(self, x_t, t, classes):
            alpha_bar = alpha_bars[t[0]].item()
            eps = torch.empty_like(x_t)
            for label in classes.unique().tolist():
                rows = classes == label
                pool = reference if label == self.null_class else reference[labels == label]
                x0_pred = ideal_x0(x_t[rows], alpha_bar, pool)
                eps[rows] = (x_t[rows] - math.sqrt(alpha_bar) * x0_pred) / math.sqrt(1 - alpha_bar)
            return eps

    alpha_bars = edit.lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    x0 = reference[[1]].expand(8, -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    toward_1 = edit.sdedit(edit.guided_denoiser(ExactConditional(), torch.tensor([1]), 2.0), alpha_bars, x0, 0.8,
                           50, 0.0, noise)
    assert labels[nearest(x0, reference)[0]].tolist() == [0] * 8
    assert labels[nearest(toward_1, reference)[0]].tolist() == [1] * 8
    toward_0 = edit.sdedit(edit.guided_denoiser(ExactConditional(), torch.tensor([0]), 2.0), alpha_bars, x0, 0.8,
                           50, 0.0, noise)
    assert labels[nearest(toward_0, reference)[0]].tolist() == [0] * 8


def test_masks(edit):
    generator = torch.Generator().manual_seed(0)
    box, left = edit.make_hole("box", 8, 1, generator), edit.make_hole("left", 8, 1, generator)
    assert box.sum() == 16 and box[0, 0, 2:6, 2:6].all() and left[0, 0, :, :4].all() and left.sum() == 32
    strokes = edit.make_hole("strokes", 16, 2, generator)
    assert 0 < strokes[0].sum() < 256 and not torch.equal(strokes[0], strokes[1])


def test_command_line_edits_a_checkpoint_and_refuses_bad_input(tiny_data_dir, tmp_path, edit, capsys):
    lesson02 = load_lesson("02_ddpm.py")
    lesson02.main(["--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "l02"), "--max-steps", "2", "--width",
                   "8", "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "1", "--timesteps", "25"])
    checkpoint = tmp_path / "l02" / "checkpoint.pt"
    picture = tmp_path / "shirt.png"
    Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8)).save(picture)
    out = tmp_path / "edits"
    common = ["--checkpoint", checkpoint, "--out", out, "--steps", "5", "--count", "2", "--data-dir", tiny_data_dir]
    for command, extra, figure in (("sdedit", ["--input", picture, "--strength", "0.3,1"], "sdedit.png"),
                                   ("inpaint", ["--test-index", "3", "--mask", "strokes", "--resample", "2"],
                                    "inpaint.png")):
        result = run_in_process(edit.main, "edit_images.py", command, *common, *extra, capsys=capsys)
        assert result.returncode == 0, result.stderr
        assert (out / figure).stat().st_size > 0 and f"wrote {out / figure}" in result.stdout
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(mask)
    result = run_in_process(edit.main, "edit_images.py", "inpaint", *common, "--mask-image", mask, capsys=capsys)
    assert result.returncode == 0, result.stderr
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "small_mask.png")
    torch.save({"format": 1, "lesson": "05_latent_diffusion", "config": {}}, tmp_path / "l05.pt")
    for argv, expected, code in (
            (["sdedit", *common, "--input", tmp_path / "missing.png"], "is not a file", 1),
            (["sdedit", *common, "--input", tmp_path / "broken.png"], "cannot be read as an image", 1),
            (["inpaint", *common, "--mask-image", tmp_path / "small_mask.png"], "--mask-image is 10x10", 1),
            (["sdedit", *common, "--strength", "0"], "every strength must lie in (0, 1]", 2),
            (["sdedit", *common, "--strength", "1.5"], "every strength must lie in (0, 1]", 2),
            (["sdedit", *common, "--test-index", "9999"], "--test-index must be below 256", 1),
            (["sdedit", *common, "--steps", "40"], "--steps 40 is more than the 25 timesteps", 1),  # not cut to T
            (["translate", *common, "--class-label", "1"], "translate needs a lesson 03 checkpoint", 1),
            (["sdedit", "--checkpoint", tmp_path / "l05.pt", "--out", out], "not yet on latents", 1)):
        result = run_in_process(edit.main, "edit_images.py", *argv, capsys=capsys)
        shown = [line.split("\r")[-1] for line in result.stderr.split("\n") if line.split("\r")[-1].strip()]
        assert result.returncode == code and len(shown) == 1 and expected in shown[0], (argv, result.stderr)


def test_class_translation_with_a_trained_toy_model(edit):
    """Lesson 03's own network, trained for a few seconds on 8x8 pictures of two classes (a bright square in the
    left or in the right half): edits of class-0 pictures towards class 1 move the square to the right half, as a
    simple classifier (which half is brighter) sees it; the same edit towards class 0 keeps them class 0."""
    lesson03 = edit.lesson03
    generator = torch.Generator().manual_seed(0)

    def pictures(labels):
        images = torch.full((len(labels), 1, 8, 8), -1.0)
        rows = torch.randint(0, 5, (len(labels),), generator=generator)
        for image, label, row in zip(images, labels.tolist(), rows.tolist()):
            image[:, row:row + 3, 4 * label:4 * label + 3] = 1.0
        return images

    def side(images):  # 1 where the right half is brighter
        return (images[..., 4:].sum((1, 2, 3)) > images[..., :4].sum((1, 2, 3))).long()

    torch.manual_seed(0)
    model = lesson03.ConditionalUNet(channels=1, width=16, channel_mults=(1, 2), num_res_blocks=1, num_classes=2)
    schedule = lesson03.make_schedule("cpu", 25)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):  # measured: all 32 edits then move and none stays wrong; untrained, 38% and 41%
        labels = torch.randint(0, 2, (64,), generator=generator)
        loss = lesson03.loss_fn(model, pictures(labels), labels, schedule, generator, p_uncond=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x0 = pictures(torch.zeros(32, dtype=torch.long))
    noise = torch.randn(x0.shape, generator=generator)
    assert side(x0).tolist() == [0] * 32
    toward_1 = edit.sdedit(edit.guided_denoiser(model, torch.tensor([1]), 3.0), schedule["alpha_bars"], x0, 0.8, 25,
                           1.0, noise, generator)
    toward_0 = edit.sdedit(edit.guided_denoiser(model, torch.tensor([0]), 3.0), schedule["alpha_bars"], x0, 0.8, 25,
                           1.0, noise, generator)
    assert side(toward_1).float().mean() >= 0.8, side(toward_1).tolist()
    assert side(toward_0).float().mean() <= 0.2, side(toward_0).tolist()


def test_sdedit_and_inpaint_run_on_a_lesson03_checkpoint_unconditionally(tiny_data_dir, tmp_path, edit, capsys):
    """Without a class asked for, a lesson 03 checkpoint edits with its unconditional model (the null class)."""
    edit.lesson03.main(["--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "l03"), "--max-steps", "2",
                        "--width", "8", "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "1",
                        "--timesteps", "25"])
    checkpoint = tmp_path / "l03" / "checkpoint.pt"
    make_denoiser, alpha_bars, config = edit.load_denoiser(checkpoint, torch.device("cpu"))
    x_t = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = edit.lesson03.build_model(config)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["ema"])
    null = torch.full((2,), model.null_class)
    with torch.no_grad():
        eps_pred, _ = make_denoiser(None, None)(x_t, 10, alpha_bars[10].item())
        expected = model.eval()(x_t, torch.full((2,), 10), null)
    x0 = ((x_t - (1 - alpha_bars[10]).sqrt() * expected) / alpha_bars[10].sqrt()).clamp(-1, 1)
    assert torch.allclose(eps_pred, (x_t - alpha_bars[10].sqrt() * x0) / (1 - alpha_bars[10]).sqrt(), atol=1e-5)
    for command in ("sdedit", "inpaint"):
        result = run_in_process(edit.main, "edit_images.py", command, "--checkpoint", checkpoint, "--out",
                                tmp_path / "edits", "--steps", "4", "--count", "1", "--data-dir", tiny_data_dir,
                                capsys=capsys)
        assert result.returncode == 0, result.stderr
