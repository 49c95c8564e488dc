"""Lesson 04: DDIM against Song et al. 2021 and DDPM, lesson 02 checkpoints, the command line."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from conftest import assert_ema_update_rule, assert_refused, assert_sampling_uses_the_ema_weights, load_lesson
from utils.runtime import LessonError, run


@pytest.fixture(scope="module")
def lesson04():
    return load_lesson("04_ddim_fast_sampling.py")


@pytest.fixture(scope="module")
def lesson02():
    return load_lesson("02_ddpm.py")


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "quadratic", "logsnr", "flow_time"])
@pytest.mark.parametrize("steps", [1, 3, 10, 50, 333, 1000])
def test_timestep_sequences_are_valid(lesson04, spacing, steps):
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    taus = lesson04.timestep_sequence(steps, spacing, alpha_bars)
    assert len(taus) == steps and 0 <= taus[0]
    assert all(a < b for a, b in zip(taus, taus[1:]))  # increasing and distinct (walked backwards)
    assert taus[-1] <= 999
    if steps == 1000:
        assert taus == list(range(1000))
    if spacing in ("trailing", "quadratic", "logsnr", "flow_time"):
        assert taus[-1] == 999  # the first step starts from pure noise
    pairs = lesson04.timestep_pairs(steps, spacing, alpha_bars)
    assert pairs[0][0] == taus[-1] and pairs[-1] == (taus[0], -1)  # from the top down to the clean image
    assert all(t_prev == t_next for (_, t_prev), (t_next, _) in zip(pairs, pairs[1:]))


def test_timestep_spacings_match_diffusers_definitions(lesson04):
    """diffusers' DDIMScheduler.set_timesteps (steps_offset 0): trailing round(arange(T, 0, -T/S)) - 1,
    leading arange(S) * (T // S), linspace round(linspace(0, T - 1, S))."""
    for steps in (3, 7, 10, 50, 333):
        assert lesson04.timestep_sequence(steps, "trailing") == sorted(
            (np.round(np.arange(1000, 0, -1000 / steps)) - 1).astype(int).tolist())
        assert lesson04.timestep_sequence(steps, "leading") == (np.arange(steps) * (1000 // steps)).tolist()
        assert lesson04.timestep_sequence(steps, "linspace") == np.linspace(0, 999, steps).round().astype(int).tolist()
    assert lesson04.timestep_sequence(50, "trailing")[-1] == 999
    assert lesson04.timestep_sequence(50, "leading")[-1] == 980


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_spacing_takes_equal_steps_in_log_snr(lesson04, schedule):
    """logsnr: the t nearest to each of S equally spaced lambda = 0.5 log(alpha_bar / (1 - alpha_bar)), from
    lambda at t = T - 1 up to (not including) lambda at t = 0, computed here independently in numpy (float64)."""
    alpha_bars = lesson04.make_schedule(schedule, "cpu")["alpha_bars"]
    lambdas = 0.5 * np.log(alpha_bars.double().numpy() / (1 - alpha_bars.double().numpy()))
    checked = 0
    for steps in (3, 5, 8, 10):
        targets = lambdas[-1] + (lambdas[0] - lambdas[-1]) * np.arange(steps) / steps
        expected = sorted(np.abs(lambdas[None, :] - targets[:, None]).argmin(axis=1).tolist())
        if len(set(expected)) == steps:  # where two targets round to one t the lesson moves one of them
            assert lesson04.timestep_sequence(steps, "logsnr", alpha_bars) == expected, (schedule, steps)
            checked += 1
    assert checked >= 2
    with pytest.raises(ValueError, match="alpha_bars"):
        lesson04.timestep_sequence(10, "logsnr")
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        lesson04.timestep_sequence(10, "uniform", alpha_bars)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_flow_time_spacing_takes_equal_steps_in_flow_time(lesson04, schedule):
    """flow_time: the t nearest to each of s = 1, 1 - 1/S, ..., 1/S, where s = sigma / (alpha + sigma) is the time of
    the straight path with x_t's signal-to-noise ratio (SD3's sigmas at shift 1), computed here in numpy."""
    alpha_bars = lesson04.make_schedule(schedule, "cpu")["alpha_bars"]
    alpha, sigma = np.sqrt(alpha_bars.double().numpy()), np.sqrt(1 - alpha_bars.double().numpy())
    times = sigma / (alpha + sigma)
    checked = 0
    for steps in (3, 5, 8, 10):
        targets = 1 - np.arange(steps) / steps
        expected = sorted(np.abs(times[None, :] - targets[:, None]).argmin(axis=1).tolist())
        if len(set(expected)) == steps:
            assert lesson04.timestep_sequence(steps, "flow_time", alpha_bars) == expected, (schedule, steps)
            visited = times[expected][::-1]  # the flow times walked, from 1 down: steps of 1/S
            assert np.abs(np.diff(visited) + 1 / steps).max() < 0.02, (schedule, steps, visited)
            checked += 1
    assert checked >= 3
    with pytest.raises(ValueError, match="alpha_bars"):
        lesson04.timestep_sequence(10, "flow_time")


def test_a_flow_model_is_sampled_in_equal_steps_of_flow_time_by_default(lesson04):
    """spacing_for: on a flow checkpoint every sampler defaults to flow_time (measured best at 10 calls); eps and
    v keep DEFAULT_SPACING; a chosen spacing wins. sample() follows it."""
    for sampler in lesson04.SAMPLER_NAMES:
        assert lesson04.spacing_for(sampler, None, "flow") == "flow_time"
        for prediction in ("eps", "v"):
            assert lesson04.spacing_for(sampler, None, prediction) == lesson04.DEFAULT_SPACING[sampler]
        assert lesson04.spacing_for(sampler, "leading", "flow") == "leading"
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def flow_model(x, t):  # any smooth velocity: the spacing decides where it is asked
        return torch.tanh(x) * (1 + t[:, None, None, None] / 1000)

    for sampler in lesson04.SAMPLER_NAMES:
        default, _ = lesson04.sample(flow_model, alpha_bars, x_T, 10, sampler, prediction="flow")
        chosen, _ = lesson04.sample(flow_model, alpha_bars, x_T, 10, sampler, spacing="flow_time", prediction="flow")
        other, _ = lesson04.sample(flow_model, alpha_bars, x_T, 10, sampler, spacing="trailing", prediction="flow")
        assert torch.equal(default, chosen) and not torch.equal(default, other), sampler


def test_each_sampler_has_its_measured_default_spacing_and_clipping(lesson04):
    """sample() without spacing uses DEFAULT_SPACING (trailing for DDIM and Euler, logsnr for DPM-Solver++, linspace for Heun), and clips x0
    only for eps-prediction unless told otherwise."""
    assert lesson04.DEFAULT_SPACING == {"ddim": "trailing", "dpm-solver++": "logsnr", "euler": "trailing", "heun": "linspace"}
    assert lesson04.clip_for("eps") and not lesson04.clip_for("v")
    assert not lesson04.clip_for("eps", False) and lesson04.clip_for("v", True)
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    eps_model = gaussian_denoiser(alpha_bars, 1.2, 0.5)  # exact, for pixels N(1.2, 0.5^2): clipping shows

    def v_model(x_t, t):  # the same denoiser answering v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
        alpha_bar, eps = alpha_bars[int(t[0])].item(), eps_model(x_t, t)
        x0 = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
        return alpha_bar ** 0.5 * eps - (1 - alpha_bar) ** 0.5 * x0

    for sampler in ("ddim", "dpm-solver++"):
        default, _ = lesson04.sample(v_model, alpha_bars, x_T, 10, sampler, prediction="v")
        for spacing in lesson04.TIMESTEP_SPACINGS:
            chosen, _ = lesson04.sample(v_model, alpha_bars, x_T, 10, sampler, spacing=spacing, prediction="v",
                                        clip_x0=False)
            assert torch.equal(default, chosen) == (spacing == lesson04.DEFAULT_SPACING[sampler]), (sampler, spacing)
    clipped, _ = lesson04.sample(v_model, alpha_bars, x_T, 10, prediction="v", clip_x0=True)
    assert not torch.equal(default, clipped)


def two_image_denoiser(alpha_bars):
    """The exact eps(x_t, t) when the data are two 28x28 images, all -1 and all 0.5, equally likely."""
    from utils.visualize import ideal_x0
    reference = torch.stack([torch.full((1, 28, 28), -1.0), torch.full((1, 28, 28), 0.5)])
    constants = alpha_bars.tolist()

    def model(x_t, t):
        alpha_bar = constants[int(t[0])]
        return (x_t - alpha_bar ** 0.5 * ideal_x0(x_t, alpha_bar, reference)) / (1 - alpha_bar) ** 0.5
    return model


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_deterministic_sampling_from_T_minus_1_is_unbiased(lesson04, sampler):
    """With the exact denoiser of two equally likely images, half of the samples must be the dark one, at any step
    count. Starting below T - 1 ("leading", the DDIM paper's floor(c i)) treats x_t at t = 980 as if it were pure
    noise and picks the dark image 42% of the time at 50 steps, 15% at 10 (measured); trailing gives 50.6%, and so
    must logsnr, which also starts at T - 1."""
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    model = two_image_denoiser(alpha_bars)
    x_T = torch.randn(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for steps in (10, 50):
        dark = {}
        for spacing in ("trailing", "logsnr", "leading"):
            images, _ = lesson04.sample(model, alpha_bars, x_T, steps, sampler=sampler, spacing=spacing)
            dark[spacing] = (images.flatten(1).mean(1) < -0.25).float().mean().item()
        assert abs(dark["trailing"] - 0.5) < 0.035 and abs(dark["logsnr"] - 0.5) < 0.035, (steps, dark)  # 3 s.e.
        assert dark["leading"] < 0.45, (steps, dark)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sigma_eta_1_is_the_ddpm_posterior_std(lesson04, lesson02, schedule):
    alpha_bars = lesson04.make_schedule(schedule, "cpu")["alpha_bars"].double().tolist()
    ddpm = lesson02.make_schedule(schedule, "cpu")
    for t in (1, 10, 500, 990):  # consecutive steps: the posterior's beta_tilde_t
        sigma = lesson04.ddim_sigma(alpha_bars[t], alpha_bars[t - 1], eta=1.0)
        assert sigma ** 2 == pytest.approx(ddpm["posterior_variances"][t].item(), rel=1e-3)
    # Skipping steps (t -> s): the posterior q(x_s | x_t, x_0) of the two-step forward process.
    t, s = 800, 600
    beta_ts = 1 - alpha_bars[t] / alpha_bars[s]
    expected = (1 - alpha_bars[s]) / (1 - alpha_bars[t]) * beta_ts
    assert lesson04.ddim_sigma(alpha_bars[t], alpha_bars[s], 1.0) ** 2 == pytest.approx(expected, rel=1e-9)
    assert lesson04.ddim_sigma(alpha_bars[t], alpha_bars[s], 0.0) == 0.0


def test_ddim_with_every_step_and_eta_1_is_the_ddpm_step(lesson04, lesson02):
    """Mean and variance of Eq. 12 with eta = 1 between consecutive steps equal DDPM's ancestral step (Eq. 7
    with beta_tilde), for the same noise prediction."""
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    ddpm = lesson02.make_schedule("cosine", "cpu")
    constants = lesson02.sampling_constants(ddpm, "posterior")
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def model(x, t):
        return eps

    for t in (5, 300, 700):
        # The same seed for both: the same z, so the two steps must agree exactly, mean and noise.
        alpha_bar_t, alpha_bar_prev = alpha_bars[t].item(), alpha_bars[t - 1].item()
        eps_pred, x0_pred = lesson04.predict_eps_and_x0(model, x_t, t, alpha_bar_t, clip_x0=False)
        ddim = lesson04.ddim_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev, 1.0,
                                  torch.Generator().manual_seed(9))
        ddpm_next, _ = lesson02.sample_step(model, x_t, t, constants, torch.Generator().manual_seed(9), clip_x0=False)
        assert torch.allclose(ddim, ddpm_next, atol=1e-4), t


def test_v_prediction_gives_the_same_eps_and_x0(lesson04):
    """A network that predicts v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022) and one that
    predicts eps, both exact for the same (x0, eps), must give the sampler the same eps_pred and x0_pred."""
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1, torch.randn(3, 1, 4, 4, generator=generator)
    for alpha_bar in (0.999, 0.5, 0.01, 2.4e-9):
        x_t = alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps
        v = alpha_bar ** 0.5 * eps - (1 - alpha_bar) ** 0.5 * x0
        eps_pred, x0_pred = lesson04.predict_eps_and_x0(lambda x, t: v, x_t, 7, alpha_bar, "v", clip_x0=False)
        assert torch.allclose(eps_pred, eps, atol=1e-5) and torch.allclose(x0_pred, x0, atol=1e-5), alpha_bar
        if alpha_bar > 1e-3:  # at 2.4e-9 eps's x0 divides by 5e-5: float32 rounding, the reason v exists
            eps_pred, x0_pred = lesson04.predict_eps_and_x0(lambda x, t: eps, x_t, 7, alpha_bar, "eps", clip_x0=False)
            assert torch.allclose(x0_pred, x0, atol=1e-3), alpha_bar


def gaussian_denoiser(alpha_bars, mean, std):
    """The exact eps(x_t, t) when every pixel of the data is N(mean, std^2), independently."""
    constants = alpha_bars.tolist()

    def model(x_t, t):
        alpha_bar = constants[int(t[0])]
        x0_expected = mean + alpha_bar ** 0.5 * std ** 2 / (alpha_bar * std ** 2 + 1 - alpha_bar) * (
            x_t - alpha_bar ** 0.5 * mean)
        return (x_t - alpha_bar ** 0.5 * x0_expected) / (1 - alpha_bar) ** 0.5
    return model


def test_dpm_solver_converges_to_the_exact_ode_solution_faster_than_ddim(lesson04):
    """For Gaussian data the probability-flow ODE has a closed form: it keeps (x_t - sqrt(alpha_bar) mean) /
    sqrt(alpha_bar std^2 + 1 - alpha_bar) constant. DDIM is first order (error halves with twice the steps);
    DPM-Solver++(2M) is second order and reaches in 20 steps what DDIM does not reach in 100 (measured:
    max error 0.098 for DDIM-20, 0.020 DDIM-100, 0.0039 DPM-Solver-20)."""
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    mean, std = 0.3, 0.5
    model = gaussian_denoiser(alpha_bars, mean, std)
    x_T = torch.randn(500, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    alpha_bar_T = alpha_bars[-1].item()
    exact = (mean + std * (x_T - alpha_bar_T ** 0.5 * mean) / (alpha_bar_T * std ** 2 + 1 - alpha_bar_T) ** 0.5)
    errors = {(sampler, steps, spacing): (lesson04.sample(model, alpha_bars, x_T, steps, sampler=sampler,
                                                          spacing=spacing, clip_x0=False)[0]
                                          - exact.clamp(-1, 1)).abs().max().item()
              for sampler in ("ddim", "dpm-solver++") for steps in (10, 20, 100) for spacing in ("trailing", "logsnr")}
    assert 1.6 < errors["ddim", 10, "trailing"] / errors["ddim", 20, "trailing"] < 2.5, errors  # first order
    assert errors["dpm-solver++", 10, "trailing"] / errors["dpm-solver++", 20, "trailing"] > 4, errors  # second
    assert errors["dpm-solver++", 20, "trailing"] < 0.01 < errors["ddim", 100, "trailing"], errors
    assert errors["dpm-solver++", 100, "logsnr"] < 0.01, errors  # the default spacing converges to the same


def test_dpm_solver_first_step_is_the_ddim_step(lesson04):
    """Without a previous prediction DPM-Solver++ is first order, and its first-order update is DDIM's eta = 0 step."""
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"].tolist()
    generator = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 1, 4, 4, generator=generator), torch.randn(2, 1, 4, 4, generator=generator)
    for t, t_prev in ((999, 979), (500, 400), (99, 0), (19, -1)):
        alpha_bar_t, alpha_bar_prev = alpha_bars[t], alpha_bars[t_prev] if t_prev >= 0 else 1.0
        eps_pred, x0_pred = lesson04.predict_eps_and_x0(lambda x, t: eps, x_t, t, alpha_bar_t)
        ddim = lesson04.ddim_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev, 0.0, None)
        solver, state = lesson04.dpm_solver_step(x_t, x0_pred, alpha_bar_t, alpha_bar_prev, None)
        assert torch.allclose(solver, ddim, atol=1e-5), (t, t_prev)
    # The second step is not DDIM's: it uses the line through the two latest x0 predictions.
    second, _ = lesson04.dpm_solver_step(x_t, x0_pred * 0.5, alpha_bars[500], alpha_bars[400], (x0_pred, 0.3))
    first, _ = lesson04.dpm_solver_step(x_t, x0_pred * 0.5, alpha_bars[500], alpha_bars[400], None)
    assert not torch.allclose(second, first)


def test_eta_0_is_deterministic_and_eta_1_is_not(lesson04, lesson02):
    torch.manual_seed(0)
    model = lesson02.UNet(1, 8, (1, 2), 1).eval()
    with torch.no_grad():  # move the zero-initialised output layer, so that the network predicts something
        model.head[-1].weight.normal_(0, 0.1)
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    x_T = torch.randn(2, 1, 8, 8)
    a, _ = lesson04.sample(model, alpha_bars, x_T, 10, eta=0.0)
    b, _ = lesson04.sample(model, alpha_bars, x_T, 10, eta=0.0)
    assert torch.equal(a, b)
    c, _ = lesson04.sample(model, alpha_bars, x_T, 10, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_oracle_inversion_and_sampling_round_trip(lesson04, spacing):
    """With the exact noise prediction for a single data point, inversion then sampling returns the image."""
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    x0 = torch.rand(2, 1, 8, 8) * 1.6 - 0.8

    def oracle(x_t, t):
        alpha_bar_t = alpha_bars[t].view(-1, 1, 1, 1)
        return (x_t - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).sqrt()

    noise = lesson04.ddim_invert(oracle, alpha_bars, x0, 20, spacing)
    # With one data point the oracle's ODE path is x_t = sqrt(alpha_bar_t) x0 + tiny noise: far from x0 at the top.
    assert not torch.allclose(noise, x0, atol=0.1)
    back, _ = lesson04.sample(oracle, alpha_bars, noise, 20, spacing=spacing)
    assert torch.allclose(back, x0, atol=1e-3)


def test_lesson02_checkpoint_loads_and_predicts_the_same(tiny_data_dir, tmp_path, lesson02, lesson04):
    """04's copy of the network must stay compatible with 02's checkpoints."""
    out = tmp_path / "l02"
    common = ["--data-dir", str(tiny_data_dir), "--out", str(out), "--max-steps", "3", "--width", "8",
              "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "1", "--timesteps", "25"]
    lesson02.main(common)
    model04, config = lesson04.load_model(out / "checkpoint.pt", "cpu")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    model02 = lesson02.build_model(checkpoint["config"])
    model02.load_state_dict(checkpoint["ema"])
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(model04(x, t), model02.eval()(x, t))
    assert config["schedule"] == "cosine"


def test_sampling_uses_the_ema_weights_of_a_lesson02_checkpoint(tiny_data_dir, tmp_path, lesson02, lesson04):
    from utils.visualize import save_samples_npz

    l02 = tmp_path / "l02"
    lesson02.main(["--data-dir", str(tiny_data_dir), "--out", str(l02), "--max-steps", "3", "--width", "8",
                   "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "1", "--timesteps", "25"])

    def sample_only(path, folder):  # what lesson 04 does with --checkpoint, without its other figures
        model, config = lesson04.load_model(path, "cpu")
        alpha_bars = lesson04.make_schedule(config["schedule"], "cpu", 25)["alpha_bars"]
        x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        folder.mkdir()
        save_samples_npz(lesson04.sample(model, alpha_bars, x_T, 5, prediction=config["prediction"])[0],
                         folder / "samples.npz")
    assert_sampling_uses_the_ema_weights(l02 / "checkpoint.pt", sample_only, tmp_path)


def test_cli_samples_from_a_lesson02_checkpoint(tiny_data_dir, tmp_path, lesson02, lesson04, capsys,
                                                  float32_on_device):
    l02 = tmp_path / "l02"
    lesson02.main(["--data-dir", str(tiny_data_dir), "--out", str(l02), "--max-steps", "3", "--width", "8",
                   "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "1", "--timesteps", "25"])
    out = tmp_path / "l04"
    lesson04.main(["--checkpoint", str(l02 / "checkpoint.pt"), "--data-dir", str(tiny_data_dir), "--out", str(out),
                   "--steps", "5", "--num-samples", "3", "--sample-batch-size", "2", "--interpolate"])
    for name in ("samples.png", "samples.npz", "denoising.gif", "denoising.png", "steps.png", "inversion.png",
                 "inversion_error.png", "interpolation.png", "interpolation.gif", "interpolation_grid.png"):
        assert (out / name).stat().st_size > 0, name
    assert np.load(out / "samples.npz")["images"].shape == (3, 28, 28, 1)
    printed = capsys.readouterr().out
    assert "reconstruction RMS error" in printed and "times the norm" in printed
    # The checkpoint's T = 25 decides which step counts exist: inversion at 5, 10 and 20 steps, never 50.
    assert "inversion with 20 steps" in printed and "inversion with 50 steps" not in printed
    with pytest.raises(LessonError, match="--steps 30 is more than the 25 timesteps"):
        lesson04.main(["--checkpoint", str(l02 / "checkpoint.pt"), "--data-dir", str(tiny_data_dir), "--out",
                       str(out), "--steps", "30"])
    with pytest.raises(LessonError, match="trained with --timesteps 25; it cannot be used with --timesteps 1000"):
        lesson04.main(["--checkpoint", str(l02 / "checkpoint.pt"), "--data-dir", str(tiny_data_dir), "--out",
                       str(out), "--timesteps", "1000"])
    assert len(imageio.mimread(out / "interpolation.gif")) == 2 * lesson04.INTERPOLATION_POINTS - 2
    grid = imageio.imread(out / "interpolation_grid.png")
    assert grid.shape[0] == grid.shape[1]  # 5 x 5 images


@pytest.mark.parametrize("flags,expected", [
    (["--steps", "1001"], "--steps must be at most T = 1000"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--eta", "-0.1"], "--eta: must be a finite number of at least 0"),
    (["--eta", "1.5"], "--eta must be at most 1, got 1.5"),
    (["--width", "15"], "--width must be even"),
    (["--timestep-spacing", "uniform"], "--timestep-spacing: invalid choice"),
    (["--sampler", "plms"], "--sampler: invalid choice"),
    (["--resume", "--checkpoint", "x.pt"], "--resume continues training"),
])
def test_bad_flags_exit_2_with_one_line(flags, expected, lesson04, capsys, tmp_path):
    assert_refused(lesson04.parse_args, ["--out", str(tmp_path / "out"), *flags], expected, capsys)


def test_a_lesson03_checkpoint_is_refused(tmp_path, capsys, lesson04):
    from utils.runtime import CHECKPOINT_FORMAT, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": "03_conditional_ddpm", "config": {}}, path)
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: lesson04.main(["--checkpoint", str(path), "--out", str(tmp_path / "out")]))
    assert exit_info.value.code == 1
    assert "lesson 03_conditional_ddpm, not of 02_ddpm or 04_ddim_fast_sampling" in capsys.readouterr().err


def test_without_a_checkpoint_it_trains_lesson02s_model_then_samples(tiny_data_dir, tmp_path, lesson04, monkeypatch,
                                                                   float32_on_device, capsys):
    # Training and resume are what this test checks; the full figure set is checked above.
    monkeypatch.setattr(lesson04, "STEP_COUNTS", (2, 4))
    monkeypatch.setattr(lesson04, "INVERSION_STEPS", (2,))
    out = tmp_path / "out"
    tiny = ["--data-dir", str(tiny_data_dir), "--out", str(out), "--width", "8", "--channel-mults", "1,2",
            "--batch-size", "16", "--steps", "4", "--num-samples", "2", "--timesteps", "25"]
    lesson04.main([*tiny, "--max-steps", "6"])
    assert "trained in" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["lesson"] == "04_ddim_fast_sampling" and state["step"] == 6 and state["config"]["timesteps"] == 25
    assert (out / "metrics.csv").read_text().splitlines()[-1].startswith("6,")
    for changed, named in ((["--width", "16"], "width=8, this run has width=16"),
                           (["--schedule", "linear"], "schedule=cosine, this run has schedule=linear"),
                           (["--prediction", "eps"], "prediction=v, this run has prediction=eps")):
        before = (out / "checkpoint.pt").read_bytes()
        with pytest.raises(LessonError, match=named):
            lesson04.main([*tiny, "--max-steps", "9", "--resume", *changed])
        assert (out / "checkpoint.pt").read_bytes() == before
    lesson04.main([*tiny, "--max-steps", "9", "--resume"])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 9
    capsys.readouterr()
    lesson04.main([*tiny, "--max-steps", "9", "--resume"])  # already finished: nothing to train, no time to report
    assert "trained in" not in capsys.readouterr().out
    (out / "samples.npz").unlink()
    with pytest.raises(LessonError, match="--batch-size does nothing"):  # sampling trains nothing: refused
        lesson04.main([*tiny, "--sample-only"])
    sampling = [flag for flag in tiny if flag not in ("--batch-size", "16")]
    lesson04.main([*sampling, "--sample-only"])
    assert np.load(out / "samples.npz")["images"].shape == (2, 28, 28, 1)


def test_inversion_then_sampling_reconstructs_training_images_on_a_trained_model(lesson04):
    """DDIM inversion (Eq. 12 run upwards) on a small model trained here: the noise it finds is noise-like
    (an untrained network, predicting eps = 0, would only shrink the image) and sampling from it draws the
    training image back, nearer to it than to any other training image."""
    torch.manual_seed(0)
    patterns = torch.full((10, 1, 12, 12), -1.0)  # ten images: a bright square at ten places
    for label in range(10):
        top, left = divmod(label, 5)
        patterns[label, :, 2 + 4 * top:6 + 4 * top, 1 + 2 * left:5 + 2 * left] = 1.0
    model = lesson04.UNet(1, 16, (1, 2), 1)
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):  # measured: reconstruction error 0.058 after 200 steps, 0.028 after 300, 0.022 after 600
        loss = lesson04.loss_fn(model, patterns[torch.randint(0, 10, (64,), generator=generator)], alpha_bars,
                                generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-50:]) < 0.5 * sum(losses[:50])
    model.eval()
    originals = patterns[[0, 3, 6, 9]]
    noise = lesson04.ddim_invert(model, alpha_bars, originals, 50)
    assert 0.5 < noise.std().item() < 1.5
    back, _ = lesson04.sample(model, alpha_bars, noise, 50)
    error = (back - originals).pow(2).mean().sqrt().item()
    assert error < 0.15, error
    distances = torch.cdist(back.flatten(1), patterns.flatten(1))  # 4 x 10
    assert distances.argmin(dim=1).tolist() == [0, 3, 6, 9]


def test_ema_update_rule(lesson04):
    assert_ema_update_rule(lesson04.EMA)
