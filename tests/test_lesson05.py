"""Lesson 05: the autoencoder against Kingma & Welling, the latent scale, the latent sampler, both stages' CLI."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import assert_ema_update_rule, assert_refused, assert_sampling_uses_the_ema_weights, class_pictures, load_lesson, write_idx
from utils.runtime import run


@pytest.fixture(scope="module")
def lesson05():
    return load_lesson("05_latent_diffusion.py")


@pytest.fixture
def small_data_dir(tmp_path):
    """A 12x12 'MNIST' of 256 images (3x3 latents): both stages run in seconds."""
    images, labels = class_pictures(256, seed=0)
    folder = tmp_path / "data" / "MNIST" / "raw"
    write_idx(folder / "train-images-idx3-ubyte", images[:, 8:20, 2:14])
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    return tmp_path / "data"


TINY = ["--autoencoder-width", "8", "--width", "8", "--batch-size", "32", "--steps", "5", "--num-samples", "4",
        "--device", "cpu", "--timesteps", "25"]
SAMPLING = [flag for flag in TINY if flag not in ("--batch-size", "32")]  # --sample-only refuses training flags
STAGE1 = ["--autoencoder-width", "8", "--batch-size", "32", "--device", "cpu"]  # --stage autoencoder refuses the rest


@pytest.mark.parametrize("channels,size,latent_size", [(1, 28, 7), (3, 32, 8)])
def test_autoencoder_shapes_f4(lesson05, channels, size, latent_size):
    autoencoder = lesson05.Autoencoder(channels, width=8, latent_channels=4)
    x = torch.randn(2, channels, size, size)
    mean, logvar = autoencoder.encode(x)
    assert mean.shape == logvar.shape == (2, 4, latent_size, latent_size)
    assert autoencoder.decode(mean).shape == x.shape


def test_kl_matches_the_closed_form_of_torch_distributions(lesson05):
    mean, logvar = torch.randn(3, 4, 7, 7), torch.randn(3, 4, 7, 7)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                                 torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(lesson05.kl_divergence(mean, logvar), expected, atol=1e-5)
    assert lesson05.kl_divergence(torch.zeros(5), torch.zeros(5)).abs().max() == 0  # q = p: no divergence


def test_the_loss_actually_used_is_l1_plus_the_weighted_kl_of_the_reparameterised_draw(lesson05):
    """autoencoder_loss on a stand-in autoencoder with known encoder outputs and an identity decoder: the loss
    must be |z - x| + kl_weight KL(N(mean, sigma^2) || N(0, 1)), z = mean + sigma eps (Kingma & Welling 2014,
    Section 2.4 and Appendix B), with the KL from torch.distributions and eps from the same generator."""
    generator = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator) - 1
    x = torch.randn(2, 4, 3, 3, generator=generator)

    class StandIn:
        def encode(self, images):
            return mean, logvar

        def decode(self, z):
            return z

    loss, l1 = lesson05.autoencoder_loss(StandIn(), x, 0.3, torch.Generator().manual_seed(7))
    sigma = (0.5 * logvar).exp()
    z = mean + sigma * torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, sigma), torch.distributions.Normal(0.0, 1.0))
    assert l1.item() == pytest.approx((z - x).abs().mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(l1.item() + 0.3 * kl.mean().item(), rel=1e-5)
    assert kl.mean().item() > 0.1  # the KL term is not negligible here: a wrong sign or weight shows


def test_the_scale_factor_gives_unit_standard_deviation(lesson05):
    generator = torch.Generator().manual_seed(0)
    means = 5 * torch.randn(512, 4, 7, 7, generator=generator) + 2
    stds = torch.full_like(means, 0.3)
    scale = lesson05.latent_scale(means, stds, generator)
    fresh = (means + stds * torch.randn(means.shape, generator=generator)) * scale  # another draw of q(z | x)
    assert fresh.std().item() == pytest.approx(1.0, abs=0.01)
    assert scale == pytest.approx(1 / (25 + 0.09) ** 0.5, rel=0.02)


def test_a_short_autoencoder_training_lowers_the_reconstruction_error_clearly(lesson05):
    torch.manual_seed(0)
    images = torch.from_numpy(class_pictures(512, seed=1)[0]).float()[:, None] / 127.5 - 1
    autoencoder = lesson05.Autoencoder(1, width=8, latent_channels=4)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    errors = []
    for step in range(80):  # measured: the last 10 steps' error is 0.29 of the first 10 steps' (0.29 after 60)
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        loss, l1 = lesson05.autoencoder_loss(autoencoder, batch, 1e-4, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        errors.append(l1.item())
    assert np.mean(errors[-10:]) < 0.4 * np.mean(errors[:10]), (errors[:10], errors[-10:])


def test_latent_unet_handles_odd_sizes_and_starts_at_zero(lesson05):
    model = lesson05.UNet(channels=4, width=8, channel_mults=(1, 2), size=7)
    z_t, t = torch.randn(3, 4, 7, 7), torch.tensor([0, 500, 999])
    assert torch.equal(model(z_t, t), torch.zeros_like(z_t))  # zero-initialised output layer


def test_ddim_in_latent_space_reaches_the_single_data_point_of_an_exact_model(lesson05):
    """With the exact eps for a one-point data set, deterministic DDIM lands on that point from any noise."""
    alpha_bars = lesson05.make_schedule("cpu")["alpha_bars"]
    z0 = torch.randn(1, 4, 3, 3) * 2  # latents are not bounded: nothing clips them

    def oracle(z_t, t):
        alpha_bar_t = alpha_bars[t].view(-1, 1, 1, 1)
        return (z_t - alpha_bar_t.sqrt() * z0) / (1 - alpha_bar_t).sqrt()

    z_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    sampled, kept = lesson05.ddim_sample(oracle, alpha_bars, z_T, 10, snapshots=5)
    assert torch.allclose(sampled, z0.expand(2, -1, -1, -1), atol=1e-4)
    assert len(kept) == 5


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_latent_ddim_noise_is_eq_16(lesson05, eta):
    """Lesson 05's own DDIM step adds noise of standard deviation sigma = eta sqrt((1 - alpha_bar_prev) /
    (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev) (DDIM Eq. 16). With eps_pred = 0 and z_T = 0, two
    steps (t = 999 -> 499 -> clean) end at sigma z / sqrt(alpha_bar_499): their spread measures sigma."""
    alpha_bars = lesson05.make_schedule("cpu")["alpha_bars"]
    z_T = torch.zeros(20000, 1, 1, 1)
    z0, _ = lesson05.ddim_sample(lambda z, t: torch.zeros_like(z), alpha_bars, z_T, 2, eta,
                                 torch.Generator().manual_seed(0), spacing="trailing")
    low, high = lesson05.timestep_sequence(2, "trailing")
    assert (low, high) == (499, 999)
    alpha_bar_t, alpha_bar_prev = alpha_bars[high].double().item(), alpha_bars[low].double().item()
    sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * math.sqrt(1 - alpha_bar_t / alpha_bar_prev)
    assert z0.std().item() == pytest.approx(sigma / math.sqrt(alpha_bar_prev), rel=0.03)  # 20000 draws: 0.5% s.e.


def test_latent_ddim_from_T_minus_1_is_unbiased(lesson05):
    """Lesson 05's own timestep sequence: with the exact denoiser of two equally likely 28x28 "latents" (-1, 0.5),
    deterministic DDIM must draw each half of the time. The DDIM paper's leading spacing starts at t = 980 for 50
    steps and treats that x_t as pure noise: it picks the low latent about 42% of the time (15% at 10 steps)."""
    from utils.visualize import ideal_x0
    alpha_bars = lesson05.make_schedule("cpu")["alpha_bars"]
    constants = alpha_bars.tolist()
    reference = torch.stack([torch.full((1, 28, 28), -1.0), torch.full((1, 28, 28), 0.5)])  # as lesson 04's test

    def model(z_t, t):
        alpha_bar = constants[int(t[0])]
        return (z_t - alpha_bar ** 0.5 * ideal_x0(z_t, alpha_bar, reference)) / (1 - alpha_bar) ** 0.5

    z_T = torch.randn(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert lesson05.timestep_sequence(50, "trailing")[-1] == 999 and lesson05.timestep_sequence(50)[-1] == 980
    for steps in (10, 50):
        low = {spacing: (lesson05.ddim_sample(model, alpha_bars, z_T, steps, spacing=spacing)[0].flatten(1).mean(1)
                         < -0.25).float().mean().item() for spacing in ("trailing", "leading")}
        assert abs(low["trailing"] - 0.5) < 0.035 and low["leading"] < 0.45, (steps, low)


def test_default_spacing_survives_a_one_percent_error_in_the_predicted_noise(lesson05):
    """The exact denoiser of two equally likely latents (-1, 0.5), with 0.01 added to its eps: at t = T - 1 the
    cosine schedule's sqrt(alpha_bar) is 5e-5, so trailing spacing turns that error into an offset of 200 in
    z0_pred and sends nearly every sample to one latent (and the trained default model drew decoded noise).
    The default spacing must still draw both, about equally often, at the default 200 steps with eta = 1."""
    from utils.visualize import ideal_x0
    alpha_bars = lesson05.make_schedule("cpu")["alpha_bars"]
    constants = alpha_bars.tolist()
    reference = torch.stack([torch.full((4, 7, 7), -1.0), torch.full((4, 7, 7), 0.5)])

    def model(z_t, t):
        alpha_bar = constants[int(t[0])]
        return (z_t - alpha_bar ** 0.5 * ideal_x0(z_t, alpha_bar, reference)) / (1 - alpha_bar) ** 0.5 + 0.01

    def share_low(**spacing):
        z_T = torch.randn(500, 4, 7, 7, generator=torch.Generator().manual_seed(0))
        z0, _ = lesson05.ddim_sample(model, alpha_bars, z_T, lesson05.DEFAULT_STEPS, 1.0,
                                     torch.Generator().manual_seed(1), **spacing)
        return (z0.flatten(1).mean(1) < -0.25).float().mean().item()

    default, trailing = share_low(), share_low(spacing="trailing")
    assert 0.25 < default < 0.75, default  # measured: 0.658
    assert min(trailing, 1 - trailing) < 0.05, trailing  # measured: 0.992 at the low latent; what the default avoids


@pytest.fixture
def lesson(lesson05, capsys):
    """Run lesson 05's command line in this process (as `python 05_latent_diffusion.py ARGS` would, errors
    included) -> an object with returncode, stdout and stderr."""
    def call(*args):
        try:
            run(lambda: lesson05.main([str(arg) for arg in args]))
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
    return call


def test_stages_one_by_one_then_sample_only(small_data_dir, tmp_path, lesson, float32_on_device):
    out = tmp_path / "out"
    common = ["--data-dir", small_data_dir, "--out", out, *TINY]
    first = lesson("--stage", "autoencoder", "--max-steps", "4", "--data-dir", small_data_dir, "--out", out, *STAGE1)
    assert first.returncode == 0, first.stderr
    for name in ("autoencoder.pt", "reconstructions.png", "latents.png", "autoencoder_loss.png"):
        assert (out / name).stat().st_size > 0 and f"wrote {out / name}" in first.stdout
    assert not (out / "checkpoint.pt").exists() and "trained the autoencoder in" in first.stdout
    second = lesson("--stage", "diffusion", "--max-steps", "4", *common)
    assert second.returncode == 0, second.stderr
    assert "reusing the trained autoencoder" in second.stdout and "cheaper" not in second.stdout
    assert "trained the diffusion model in" in second.stdout and "trained the autoencoder" not in second.stdout
    assert "note: --ema-decay 0.999 takes effect only from step 8990; in these 4 steps" in second.stdout
    for name in ("checkpoint.pt", "samples.png", "samples.npz", "denoising.gif", "denoising.png", "loss.png",
                 "metrics.csv"):
        assert (out / name).stat().st_size > 0, name
    assert np.load(out / "samples.npz")["images"].shape == (4, 12, 12, 1)
    (out / "samples.npz").unlink()
    refused = lesson("--sample-only", *common)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "error: --batch-size does nothing with --sample-only: it trains nothing; leave it out"]
    third = lesson("--sample-only", "--interpolate", "--data-dir", small_data_dir, "--out", out, *SAMPLING)
    assert third.returncode == 0, third.stderr
    assert np.load(out / "samples.npz")["images"].shape == (4, 12, 12, 1)
    for name in ("interpolation.png", "interpolation.gif", "interpolation_grid.png"):
        assert (out / name).stat().st_size > 0 and f"wrote {out / name}" in third.stdout
    # The checkpoint keeps its T = 25: sampling takes it from there, and refuses more steps than it has.
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["timesteps"] == 25
    default_steps = lesson("--sample-only", "--out", out, "--num-samples", "1", "--device", "cpu")
    assert default_steps.returncode == 0 and "(25 DDIM steps" in default_steps.stdout  # min(200, T)
    too_many = lesson("--sample-only", "--out", out, "--steps", "30")
    assert too_many.returncode == 1 and "--steps 30 is more than the 25 timesteps" in too_many.stderr
    assert_sampling_uses_the_ema_weights(out / "checkpoint.pt", lambda path, folder: lesson(
        "--sample-only", "--checkpoint", path, "--out", folder, *SAMPLING), tmp_path)


def test_latents_are_scaled_for_the_diffusion_model_and_unscaled_for_the_decoder(small_data_dir, tmp_path, lesson05,
                                                                                lesson, monkeypatch):
    """LDM Section 4.3.2, on a real run: the diffusion model trains on z0 = z x scale (unit variance), and the
    sampler's z0 is divided by the same scale before it is decoded."""
    seen, events = [], []  # events: ("sampled", z0) and ("decoded", z) in the order they happen
    real_loss, real_ddim, real_decode = lesson05.loss_fn, lesson05.ddim_sample, lesson05.Autoencoder.decode
    real_encode = lesson05.encode_dataset  # a briefly trained autoencoder's latents have std near 1: make it 3
    monkeypatch.setattr(lesson05, "encode_dataset", lambda *arguments, **options: tuple(
        3 * part for part in real_encode(*arguments, **options)))
    monkeypatch.setattr(lesson05, "loss_fn", lambda model, z0, *rest: seen.append(z0) or real_loss(model, z0, *rest))

    def ddim(*arguments, **options):
        z0, kept = real_ddim(*arguments, **options)
        events.append(("sampled", z0))
        return z0, kept
    monkeypatch.setattr(lesson05, "ddim_sample", ddim)
    monkeypatch.setattr(lesson05.Autoencoder, "decode",
                        lambda self, z: events.append(("decoded", z)) or real_decode(self, z))
    out = tmp_path / "out"
    assert lesson("--data-dir", small_data_dir, "--out", out, "--max-steps", "20", *TINY).returncode == 0
    scale = torch.load(out / "checkpoint.pt", weights_only=True)["config"]["scale"]
    z0 = torch.cat([batch.detach() for batch in seen[:20]])  # the 20 training steps (a timing step follows)
    assert abs(1 / scale - 1) > 0.2, scale  # unscaled latents would show (their std is 1 / scale)
    assert z0.std().item() == pytest.approx(1.0, abs=0.1)
    first = next(index for index, (kind, _) in enumerate(events) if kind == "sampled")
    (kind, decoded), sampled = events[first + 1], events[first][1]  # the samples' decode, right after sampling
    assert kind == "decoded" and torch.allclose(decoded, sampled / scale)


def test_resume_of_stage_two_is_exact(small_data_dir, tmp_path, lesson, lesson05, monkeypatch):
    for name in ("write_samples", "write_autoencoder_figures"):  # the training state is what counts here
        monkeypatch.setattr(lesson05, name, lambda *arguments: [])

    def states(out):
        checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
        return checkpoint["model"], checkpoint["ema"], checkpoint["optimizer"]["state"]

    for out in (tmp_path / "straight", tmp_path / "resumed"):
        assert lesson("--stage", "autoencoder", "--max-steps", "4", "--data-dir", small_data_dir, "--out", out,
                      *STAGE1).returncode == 0
    straight = lesson("--stage", "diffusion", "--max-steps", "12", "--data-dir", small_data_dir,
                      "--out", tmp_path / "straight", *TINY)
    assert straight.returncode == 0, straight.stderr
    common = ["--stage", "diffusion", "--data-dir", small_data_dir, "--out", tmp_path / "resumed", *TINY]
    assert lesson("--max-steps", "5", *common).returncode == 0
    resumed = lesson("--max-steps", "12", "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr
    for a, b in zip(states(tmp_path / "straight"), states(tmp_path / "resumed")):
        for key in a:
            values_a = a[key] if isinstance(a[key], dict) else {"": a[key]}
            values_b = b[key] if isinstance(b[key], dict) else {"": b[key]}
            for name in values_a:
                assert torch.equal(values_a[name], values_b[name]), (key, name)


@pytest.mark.parametrize("flags,expected", [
    (["--steps", "1001"], "--steps must be at most T = 1000"),
    (["--eta", "-1"], "--eta: must be a finite number of at least 0"),
    (["--eta", "1.01"], "--eta must be at most 1, got 1.01"),
    (["--width", "6"], "--width must be a multiple of 4"),
    (["--stage", "decoder"], "--stage: invalid choice"),
    (["--epochs", "0"], "--epochs: must be at least 1"),
])
def test_bad_flags_exit_2_with_one_line(lesson05, flags, expected, capsys, tmp_path):
    assert_refused(lesson05.parse_args, ["--out", str(tmp_path / "out"), *flags], expected, capsys)


def test_missing_or_mismatched_autoencoder_is_one_line(small_data_dir, tmp_path, lesson):
    out = tmp_path / "out"
    common = ["--data-dir", small_data_dir, "--out", out, *TINY]
    missing = lesson("--stage", "diffusion", "--max-steps", "2", *common)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: --stage diffusion needs a trained")
    nothing = lesson("--resume", "--max-steps", "2", *common)
    assert nothing.returncode == 1 and "no checkpoint in" in nothing.stderr and "Traceback" not in nothing.stderr
    assert lesson("--stage", "autoencoder", "--max-steps", "2", "--data-dir", small_data_dir, "--out", out,
                  *STAGE1).returncode == 0
    other = lesson("--stage", "diffusion", "--max-steps", "2", *common, "--latent-channels", "3")
    assert other.returncode == 1 and "latent_channels=4" in other.stderr and "latent_channels=3" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_cifar_shaped_data_gives_8x8x4_latents_and_colour_samples(tmp_path, lesson05, monkeypatch):
    from utils import data

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 3, 32, 32)).astype(np.uint8)
    monkeypatch.setattr(data, "_load_cifar", lambda data_dir, split, download: (images, np.arange(40) % 10))
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    out = tmp_path / "out"
    lesson05.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                   "--max-steps", "2", *TINY[:4], "--batch-size", "8", "--steps", "3", "--num-samples", "2",
                   "--device", "cpu"])
    assert np.load(out / "samples.npz")["images"].shape == (2, 32, 32, 3)
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert (config["channels"], config["latent_size"]) == (3, 8)
    assert (out / "latents.png").stat().st_size > 0


def test_ema_update_rule(lesson05):
    assert_ema_update_rule(lesson05.EMA)
