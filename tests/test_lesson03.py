"""Lesson 03: classifier-free guidance against Ho & Salimans 2022, and the lesson from the command line."""

import math

import numpy as np
import pytest
import torch

from conftest import (
    assert_ema_update_rule, assert_refused, assert_sampling_uses_the_ema_weights, load_lesson, run_in_process,
    run_lesson, write_idx,
)
from utils.runtime import load_checkpoint, run

TINY = ["--width", "8", "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "4", "--warmup-steps", "5",
        "--timesteps", "25"]  # T = 25: sampling is cheap


@pytest.fixture
def small_data_dir(tmp_path):
    """A 12x12 'MNIST' of 160 images: a square's position depends on its label. At 12x12 the guided
    sampler's 1000 steps (for the samples and the 50-image guidance sweep) take seconds, not minutes."""
    rng = np.random.default_rng(0)
    labels = np.arange(160) % 10
    images = np.zeros((160, 12, 12), dtype=np.uint8)
    for image, label in zip(images, labels):
        top, left = divmod(int(label), 5)
        image[2 + 4 * top:6 + 4 * top, 1 + 2 * left:5 + 2 * left] = 255
    images = np.clip(images.astype(int) + rng.integers(0, 30, images.shape), 0, 255)
    folder = tmp_path / "data" / "MNIST" / "raw"
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def lesson03():
    return load_lesson("03_conditional_ddpm.py")


@pytest.fixture(scope="module")
def trained_model(lesson03):
    """A tiny conditional network trained a few steps, so that labels and the null token matter."""
    torch.manual_seed(0)
    model = lesson03.ConditionalUNet(channels=1, width=8, channel_mults=(1, 2), num_res_blocks=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x0, labels = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    schedule = lesson03.make_schedule("cpu")
    for _ in range(5):
        optimizer.zero_grad()
        lesson03.loss_fn(model, x0, labels, schedule, None, p_uncond=0.2).backward()
        optimizer.step()
    return model.eval()


def test_cosine_schedule_and_posterior_match_the_papers(lesson03):
    """Lesson 03's own schedule: Improved DDPM Eq. 17 (betas clipped at 0.999), and the posterior
    q(x_{t-1} | x_t, x_0) of DDPM Eq. 7 from Bayes' rule, in float64, independent of the lesson's code."""
    for timesteps in (1000, 25):
        schedule = lesson03.make_schedule("cpu", timesteps)

        def f(t):
            return math.cos((t / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(0.999, 1 - f(t + 1) / f(t)) for t in range(timesteps)], dtype=torch.float64)
        assert torch.allclose(schedule["betas"].double(), betas, rtol=1e-5, atol=1e-7)
        x0, x_t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        for t in sorted({1, 2, timesteps // 2, timesteps - 1}):
            alpha, alpha_bar_prev = 1 - betas[t], torch.prod(1 - betas[:t])
            precision = alpha / betas[t] + 1 / (1 - alpha_bar_prev)  # product of the two Gaussians in x_{t-1}
            mean = (alpha.sqrt() * x_t / betas[t] + alpha_bar_prev.sqrt() * x0 / (1 - alpha_bar_prev)) / precision
            coded = schedule["posterior_x0_weights"][t] * x0 + schedule["posterior_xt_weights"][t] * x_t
            assert torch.allclose(coded, mean, rtol=1e-4, atol=1e-6), (timesteps, t)
            assert schedule["posterior_variances"][t].item() == pytest.approx(1 / precision.item(), rel=1e-4)
        assert schedule["posterior_variances"][0].item() == 0


def test_ema_update_rule(lesson03):
    assert_ema_update_rule(lesson03.EMA)


def test_w_zero_is_exactly_the_conditional_prediction(lesson03, trained_model):
    x_t, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900]), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        assert torch.equal(lesson03.guided_eps(trained_model, x_t, t, labels, 0.0), trained_model(x_t, t, labels))


def test_doubled_batch_equals_two_separate_passes_and_eq_6(lesson03, trained_model):
    x_t, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([10, 400, 800]), torch.tensor([1, 2, 3])
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        eps_cond, eps_uncond = trained_model(x_t, t, labels), trained_model(x_t, t, null)
        for w in (0.5, 1.0, 4.0):
            expected = (1 + w) * eps_cond - w * eps_uncond  # Ho & Salimans Eq. 6
            assert torch.allclose(lesson03.guided_eps(trained_model, x_t, t, labels, w), expected, atol=1e-5)
        # The guidance pushes the prediction away from the unconditional one, along (cond - uncond).
        assert not torch.allclose(eps_cond, eps_uncond)


def test_null_class_is_a_learned_extra_token(lesson03, trained_model):
    assert trained_model.null_class == 10
    assert trained_model.class_embedding.num_embeddings == 11
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 100])
    with torch.no_grad():
        null = trained_model(x_t, t, torch.tensor([10, 10]))
        assert null.shape == (2, 1, 8, 8)
        assert not torch.allclose(null, trained_model(x_t, t, torch.tensor([4, 4])))
    # After training with label dropout the null token's embedding has moved from its initial value.
    torch.manual_seed(0)  # the same start as trained_model
    fresh = lesson03.ConditionalUNet(channels=1, width=8, channel_mults=(1, 2), num_res_blocks=1)
    assert not torch.equal(fresh.class_embedding.weight[10], trained_model.class_embedding.weight[10])


@pytest.mark.parametrize("p_uncond", [0.1, 0.3])
def test_label_dropout_rate(lesson03, p_uncond):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(256) % 10
    dropped = [(lesson03.drop_labels(labels, p_uncond, 10, generator) == 10).float().mean().item()
               for _ in range(200)]
    rate = sum(dropped) / len(dropped)
    assert rate == pytest.approx(p_uncond, abs=0.01)  # 51,200 draws: the standard error is about 0.002
    kept = lesson03.drop_labels(labels, p_uncond, 10, generator)
    assert torch.equal(kept[kept != 10], labels[kept != 10])  # labels are dropped, never changed
    assert (lesson03.drop_labels(labels, 0.0, 10, generator) == labels).all()


def test_training_lowers_the_loss(lesson03):
    torch.manual_seed(0)
    labels = torch.arange(32) % 2
    x0 = -torch.ones(32, 1, 8, 8)
    x0[labels == 1, :, 2:6, 2:6] = 1  # class 1 has a square, class 0 is empty
    model = lesson03.ConditionalUNet(channels=1, width=8, channel_mults=(1, 2), num_res_blocks=1)
    schedule = lesson03.make_schedule("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def mean_loss():
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return sum(lesson03.loss_fn(model, x0, labels, schedule, g, 0.1).item() for _ in range(10)) / 10

    before = mean_loss()
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):  # measured: the loss falls to 0.10 of where it started (0.12 after 60 steps)
        optimizer.zero_grad()
        lesson03.loss_fn(model, x0, labels, schedule, generator, 0.1).backward()
        optimizer.step()
    assert mean_loss() < 0.5 * before


def test_sample_labels_give_one_row_per_class(lesson03):
    args = lesson03.parse_args(["--num-samples", "60"])
    assert lesson03.sample_labels(args, 10, "cpu").tolist() == [c for c in range(10) for _ in range(6)]
    args = lesson03.parse_args(["--num-samples", "5", "--class-label", "7"])
    assert lesson03.sample_labels(args, 10, "cpu").tolist() == [7] * 5


@pytest.mark.parametrize("count", [1, 5, 9, 10, 11, 21, 59, 64, 99, 1000])
def test_num_samples_are_split_evenly_over_the_classes(lesson03, count):
    """--help promises "split evenly over the classes": each class gets floor(N/10) or ceil(N/10), in order."""
    labels = lesson03.sample_labels(lesson03.parse_args(["--num-samples", str(count)]), 10, "cpu").tolist()
    counts = [labels.count(c) for c in range(10)]
    assert len(labels) == count and labels == sorted(labels)
    assert set(counts) <= {count // 10, -(-count // 10)}, counts


def lesson(*args):
    return run_lesson("03_conditional_ddpm.py", *args)


def test_end_to_end_writes_every_output_with_labels(small_data_dir, tmp_path, lesson03, capsys):
    out = tmp_path / "out"
    result = run_in_process(lesson03.main, "03_conditional_ddpm.py", "--data-dir", small_data_dir, "--out", out,
                            "--max-steps", 6, *TINY, "--num-samples", 20, "--sample-batch-size", 8,
                            capsys=capsys)  # labels carry on across batches of 8, 8 and 4
    assert result.returncode == 0, result.stderr
    for name in ("checkpoint.pt", "samples.png", "samples.npz", "guidance.png", "loss.png", "metrics.csv",
                 "denoising.gif", "denoising.png"):
        assert (out / name).stat().st_size > 0, name
        assert f"wrote {out / name}" in result.stdout
    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (20, 12, 12, 1) and saved["images"].dtype == np.uint8
    assert saved["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    config = load_checkpoint(out / "checkpoint.pt", "03_conditional_ddpm")["config"]
    assert config["num_classes"] == 10 and config["timesteps"] == 25  # --timesteps 25 in TINY
    assert "note: --ema-decay 0.999 takes effect only from step 8990; in these 6 steps" in result.stdout


def test_sample_only_one_class(small_data_dir, tmp_path, lesson03, monkeypatch, float32_on_device):
    trained = tmp_path / "trained"
    with monkeypatch.context() as patch:  # train only; sampling is what this test runs next
        patch.setattr(lesson03, "write_samples", lambda *arguments: [])
        lesson03.main(["--data-dir", str(small_data_dir), "--out", str(trained), "--max-steps", "3", *TINY])
    out = tmp_path / "sampled"
    lesson03.main(["--sample-only", "--checkpoint", str(trained / "checkpoint.pt"), "--out", str(out),
                   "--class-label", "3", "--num-samples", "2", "--guidance-weight", "0"])
    assert np.load(out / "samples.npz")["labels"].tolist() == [3, 3]
    assert not (out / "checkpoint.pt").exists()
    # A checkpoint saved before the ResBlock's time layer was renamed (`embedding` -> `time`) still loads and
    # draws exactly the same images.
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        state[key] = {name.replace(".time.", ".embedding."): value for name, value in state[key].items()}
    assert any(".embedding." in name for name in state["ema"])
    torch.save(state, tmp_path / "old-names.pt")
    lesson03.main(["--sample-only", "--checkpoint", str(tmp_path / "old-names.pt"), "--out", str(tmp_path / "old"),
                   "--class-label", "3", "--num-samples", "2", "--guidance-weight", "0"])
    assert np.array_equal(np.load(tmp_path / "old" / "samples.npz")["images"], np.load(out / "samples.npz")["images"])
    with monkeypatch.context() as patch:  # the guidance sweep is not what is checked here
        patch.setattr(lesson03, "SWEEP_WEIGHTS", (0.0,))
        assert_sampling_uses_the_ema_weights(trained / "checkpoint.pt", lambda path, folder: lesson03.main(
            ["--sample-only", "--checkpoint", str(path), "--out", str(folder), "--class-label", "3",
             "--num-samples", "2"]), tmp_path)


def test_resume_gives_exactly_the_weights_of_an_uninterrupted_run(small_data_dir, tmp_path, lesson03, monkeypatch):
    monkeypatch.setattr(lesson03, "write_samples", lambda *arguments: [])  # the training state is what counts
    common = ["--data-dir", str(small_data_dir), *TINY, "--num-samples", "1", "--dropout", "0.1", "--device", "cpu"]
    lesson03.main(["--out", str(tmp_path / "straight"), "--max-steps", "20", *common])
    lesson03.main(["--out", str(tmp_path / "split"), "--max-steps", "10", *common])
    lesson03.main(["--out", str(tmp_path / "split"), "--max-steps", "20", "--resume", *common])
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt", "03_conditional_ddpm")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt", "03_conditional_ddpm")
    assert a["step"] == b["step"] == 20
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


@pytest.mark.parametrize("flags,expected", [
    (["--class-label", "10"], "--class-label must be between 0 and 9, got 10"),
    (["--class-label", "-1"], "--class-label must be between 0 and 9, got -1"),
    (["--guidance-weight", "-0.5"], "--guidance-weight: must be a finite number of at least 0"),
    (["--guidance-weight", "nan"], "--guidance-weight: must be a finite number of at least 0"),
    (["--guidance-scale", "0.5"], "--guidance-scale is diffusers' 1 + w and must be at least 1, got 0.5"),
    (["--guidance-scale", "inf"], "--guidance-scale: must be a finite number above 0"),
    (["--guidance-scale", "3", "--guidance-weight", "2"], "not allowed with argument"),
    (["--p-uncond", "1"], "--p-uncond must be in [0, 1)"),
    (["--num-samples", "0"], "--num-samples: must be at least 1"),
    (["--dataset", "svhn"], "--dataset: 'svhn' is neither a dataset"),
])
def test_bad_flags_exit_2_with_one_line(flags, expected, lesson03, capsys, tmp_path):
    assert_refused(lesson03.parse_args, ["--out", str(tmp_path / "out"), *flags], expected, capsys)


def test_guidance_scale_is_diffusers_one_plus_w(lesson03):
    """--guidance-weight is the paper's w; --guidance-scale is diffusers' guidance_scale = 1 + w, so that a value
    typed from a diffusers example means the same strength here."""
    assert lesson03.parse_args([]).guidance_weight == lesson03.GUIDANCE_WEIGHT
    assert lesson03.parse_args(["--guidance-weight", "0.5"]).guidance_weight == 0.5
    assert lesson03.parse_args(["--guidance-scale", "7.5"]).guidance_weight == 6.5
    assert lesson03.parse_args(["--guidance-scale", "1"]).guidance_weight == 0.0


def test_class_label_out_of_range_from_the_command_line(tmp_path, lesson03, capsys):
    result = run_in_process(lesson03.main, "03_conditional_ddpm.py", "--out", tmp_path / "out", "--class-label", "12",
                            capsys=capsys)
    assert result.returncode == 2 and "--class-label must be between 0 and 9" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_lesson02_checkpoint_is_refused(tmp_path, capsys, lesson03):
    from utils.runtime import CHECKPOINT_FORMAT, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": "02_ddpm", "config": {}}, path)
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: lesson03.main(["--sample-only", "--checkpoint", str(path), "--out", str(tmp_path / "out")]))
    assert exit_info.value.code == 1
    assert "checkpoint of lesson 02_ddpm, not of 03_conditional_ddpm" in capsys.readouterr().err
