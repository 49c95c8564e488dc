"""Lesson 01's mathematics against DDPM (Ho et al. 2020), its network and a real training run."""
import math

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture
def schedule(lesson01):
    return lesson01.make_schedule(torch.device("cpu"))


def test_linear_betas_match_the_paper(lesson01, schedule):
    betas = schedule["betas"]
    assert betas.shape == (1000,) and betas.dtype == torch.float32
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    steps = betas[1:] - betas[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), atol=1e-8)


@pytest.mark.parametrize("t", [0, 1, 10, 499, 999])
def test_alpha_bar_is_the_running_product_of_alphas(schedule, t):
    product = 1.0
    for s in range(t + 1):
        product *= 1.0 - (1e-4 + (0.02 - 1e-4) * s / 999)
    assert schedule["alpha_bars"][t].item() == pytest.approx(product, rel=1e-5)


def test_signal_is_gone_at_the_last_step(schedule):
    # At t = T the data must be indistinguishable from N(0, I) for sampling to start from noise.
    assert schedule["alpha_bars"][-1].item() < 1e-4


@pytest.mark.parametrize("timesteps", [50, 500, 2000])
def test_another_T_scales_the_betas_by_1000_over_T(lesson01, timesteps):
    """--timesteps T: linear betas from 1e-4 x 1000/T to 0.02 x 1000/T, so the total noise (sum of betas) and
    alpha_bar at the last step stay those of T = 1000."""
    schedule = lesson01.make_schedule(torch.device("cpu"), timesteps)
    betas = schedule["betas"].double()
    scale = 1000 / timesteps
    assert betas.shape == (timesteps,)
    assert betas[0].item() == pytest.approx(1e-4 * scale) and betas[-1].item() == pytest.approx(0.02 * scale)
    assert torch.allclose(betas[1:] - betas[:-1], torch.full_like(betas[1:], (0.02 - 1e-4) * scale / (timesteps - 1)),
                          atol=1e-7)
    assert schedule["alpha_bars"][-1].item() == pytest.approx(math.prod(1 - b for b in betas.tolist()), rel=1e-4)
    assert schedule["alpha_bars"][-1].item() < 1e-4


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_forward_process_matches_closed_form_mean_and_variance(lesson01, schedule, t):
    torch.manual_seed(0)
    x0 = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    draws = 20000
    eps = torch.randn(draws, 1, 4, 4)
    x_t = lesson01.add_noise(x0.expand(draws, -1, -1, -1), torch.full((draws,), t), eps, schedule)
    alpha_bar_t = schedule["alpha_bars"][t].item()
    variance = 1 - alpha_bar_t
    # DDPM Eq. 4: mean sqrt(alpha_bar_t) x0, variance (1 - alpha_bar_t); 5 standard errors of tolerance.
    mean_tolerance = 5 * math.sqrt(variance / draws)
    assert torch.allclose(x_t.mean(0), math.sqrt(alpha_bar_t) * x0[0], atol=mean_tolerance)
    variance_tolerance = 5 * variance * math.sqrt(2 / draws)
    assert torch.allclose(x_t.var(0), torch.full_like(x0[0], variance), atol=variance_tolerance)


def test_timestep_embedding_is_sinusoidal(lesson01):
    embedding = lesson01.timestep_embedding(torch.tensor([0, 7]), 8)
    assert embedding.shape == (2, 8)
    assert torch.allclose(embedding[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    assert torch.allclose(embedding[1, :4], torch.sin(7 * frequencies))
    assert torch.allclose(embedding[1, 4:], torch.cos(7 * frequencies))


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_network_output_shape_matches_input(lesson01, channels, size):
    model = lesson01.TinyUNet(channels, width=8)
    x = torch.randn(3, channels, size, size)
    assert model(x, torch.tensor([0, 500, 999])).shape == x.shape


def test_the_cpu_model_is_channels_last_and_computes_what_the_plain_layout_computes(lesson01):
    # build_model stores the CPU's model channels-last for speed: the same network, the same numbers, and
    # weights that load into a plain TinyUNet (the checkpoint is layout-free).
    torch.manual_seed(0)
    model = lesson01.build_model({"channels": 3, "width": 8}, torch.device("cpu"))
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.stem.weight.is_contiguous()
    plain = lesson01.TinyUNet(3, width=8)
    plain.load_state_dict(model.state_dict())
    assert plain.stem.weight.is_contiguous()
    x, t = torch.randn(4, 3, 28, 28), torch.tensor([0, 10, 500, 999])
    assert torch.allclose(model(x, t), plain(x, t), atol=1e-5)


def test_network_output_depends_on_timestep(lesson01):
    torch.manual_seed(0)
    model = lesson01.TinyUNet(1, width=8)
    x = torch.randn(2, 1, 28, 28)
    early, late = model(x, torch.tensor([10, 10])), model(x, torch.tensor([900, 900]))
    assert (early - late).abs().mean() > 1e-3


def test_network_learns_to_follow_the_mean_brightness_of_its_input(lesson01):
    # At t = T the noise to predict is x_t itself. GroupNorm removes each image's mean, so a network
    # without the blocks' shortcuts cannot learn this for images brighter or darker than average
    # (mean error stayed above 0.1 after 150 steps), and its samples drift to all black or all white.
    torch.manual_seed(0)
    model = lesson01.TinyUNet(1, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    last = torch.full((16,), 999)
    for _ in range(80):  # measured: mean error 0.011 after 80 steps
        x_t = torch.randn(16, 1, 28, 28, generator=generator) + torch.rand(16, 1, 1, 1, generator=generator) * 2 - 1
        loss = F.mse_loss(model(x_t, last), x_t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x_t = torch.randn(8, 1, 28, 28, generator=generator) + torch.linspace(-1, 1, 8).view(8, 1, 1, 1)
        mean_error = (model(x_t, last[:8]) - x_t).mean(dim=(1, 2, 3)).abs().mean().item()
    assert mean_error < 0.05


def test_training_on_a_fixed_batch_clearly_lowers_the_loss(lesson01, schedule):
    torch.manual_seed(0)
    model = lesson01.TinyUNet(1, width=8)
    x0 = torch.zeros(16, 1, 28, 28) - 1
    for index, image in enumerate(x0):
        image[:, 4 + index % 12:14 + index % 12, 6:16] = 1  # squares at different places

    def evaluate():
        with torch.no_grad():
            return lesson01.loss_fn(model, x0.repeat(4, 1, 1, 1), schedule, torch.Generator().manual_seed(1)).item()

    before = evaluate()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):  # measured: the loss falls to 0.053 of where it started
        loss = lesson01.loss_fn(model, x0, schedule, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("snr_gamma", [0.0, 5.0, 0.5])
def test_loss_weights_each_images_error_by_min_snr_over_snr(lesson01, schedule, snr_gamma):
    # Hang et al. 2023: for noise prediction, weight min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t);
    # gamma = 0 is DDPM's plain Eq. 14. The model's error differs per image so that the weights matter.
    x0 = torch.linspace(-1, 1, 32).view(32, 1, 1, 1).expand(32, 1, 8, 8).contiguous()
    offsets = torch.linspace(0.1, 2.0, 32).view(32, 1, 1, 1)
    model = lambda x_t, t: offsets * x_t  # noqa: E731  an error that differs from image to image
    loss = lesson01.loss_fn(model, x0, schedule, torch.Generator().manual_seed(3), snr_gamma)
    generator = torch.Generator().manual_seed(3)  # the same draws as loss_fn's
    t = torch.randint(0, len(schedule["betas"]), (32,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    alpha_bar = schedule["alpha_bars"][t]
    x_t = alpha_bar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - alpha_bar).sqrt().view(-1, 1, 1, 1) * eps
    errors = ((offsets * x_t - eps) ** 2).mean(dim=(1, 2, 3))
    snr = alpha_bar / (1 - alpha_bar)
    weights = torch.ones(32) if snr_gamma == 0 else torch.minimum(snr, torch.tensor(snr_gamma)) / snr
    assert torch.allclose(loss, (weights * errors).mean(), rtol=1e-5)
    if snr_gamma:
        assert (snr > snr_gamma).any() and (snr <= snr_gamma).any()  # both kinds of steps were drawn


def test_snr_gamma_is_a_flag_with_the_papers_default_and_refuses_negative_values(lesson01, capsys):
    assert lesson01.parse_args([]).snr_gamma == 5.0
    assert lesson01.parse_args(["--snr-gamma", "0"]).snr_gamma == 0.0
    with pytest.raises(SystemExit):
        lesson01.parse_args(["--snr-gamma", "-1"])
    assert "--snr-gamma" in capsys.readouterr().err


def oracle(schedule, x0_target):
    """A 'network' that predicts exactly the noise that separates x_t from x0_target."""
    def predict(x_t, t):
        alpha_bar_t = schedule["alpha_bars"][t].view(-1, 1, 1, 1)
        return (x_t - alpha_bar_t.sqrt() * x0_target) / (1 - alpha_bar_t).sqrt()
    return predict


@pytest.mark.parametrize("t", [1, 300, 999])
def test_sample_step_draws_from_the_true_posterior_given_the_true_noise(lesson01, schedule, t):
    # With eps_pred equal to the true noise, Eq. 11's mean must equal the posterior mean of
    # q(x_{t-1} | x_t, x_0) (DDPM Eq. 7), and the spread must be its variance beta_tilde_t (Eq. 7), not beta_t:
    # at t = 1 the two differ by a factor of about 2.
    torch.manual_seed(0)
    x0 = torch.full((1, 1, 100, 100), 0.5)
    x_t = torch.randn(1, 1, 100, 100)
    x_prev = lesson01.sample_step(oracle(schedule, x0), x_t, t, lesson01.sampling_constants(schedule), torch.Generator())
    alpha_t, alpha_bar_t = schedule["alphas"][t].item(), schedule["alpha_bars"][t].item()
    alpha_bar_prev, beta_t = schedule["alpha_bars"][t - 1].item(), schedule["betas"][t].item()
    posterior_mean = (math.sqrt(alpha_bar_prev) * beta_t / (1 - alpha_bar_t) * x0
                      + math.sqrt(alpha_t) * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t)
    residual = x_prev - posterior_mean
    assert residual.mean().item() == pytest.approx(0, abs=5 * math.sqrt(beta_t / 10000))
    beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    assert residual.std().item() == pytest.approx(math.sqrt(beta_tilde_t), rel=0.05)


@pytest.mark.parametrize("timesteps", [1000, 50])
def test_sampling_with_the_true_noise_ends_exactly_at_the_data(lesson01, timesteps):
    schedule = lesson01.make_schedule(torch.device("cpu"), timesteps)
    target = torch.linspace(-0.9, 0.9, 28 * 28).view(1, 1, 28, 28).repeat(2, 1, 1, 1)
    calls = []
    model = oracle(schedule, target)
    images, _ = lesson01.sample(lambda x_t, t: calls.append(t[0].item()) or model(x_t, t), schedule, (2, 1, 28, 28),
                                torch.Generator().manual_seed(0))
    assert torch.allclose(images, target, atol=1e-4)
    assert calls == list(range(timesteps - 1, -1, -1))  # every one of the schedule's T steps, from T-1 down


def test_sampling_shape_range_and_determinism(lesson01):
    schedule = lesson01.make_schedule(torch.device("cpu"), 50)  # a short chain: the checks do not need 1000 steps
    torch.manual_seed(0)
    model = lesson01.TinyUNet(1, width=8).eval()
    first, kept = lesson01.sample(model, schedule, (3, 1, 28, 28), torch.Generator().manual_seed(5), keep={49, 0})
    second, _ = lesson01.sample(model, schedule, (3, 1, 28, 28), torch.Generator().manual_seed(5))
    third, _ = lesson01.sample(model, schedule, (3, 1, 28, 28), torch.Generator().manual_seed(6))
    assert first.shape == (3, 1, 28, 28) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
    assert set(kept) == {49, 0} and torch.equal(kept[0], first)


def test_learning_rate_warms_up_then_decays_to_zero(lesson01):
    rates = [lesson01.learning_rate(step, 1000, 1e-3) for step in range(1000)]
    peak_step = max(range(1000), key=rates.__getitem__)
    assert rates[0] < rates[peak_step] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(rates[:peak_step], rates[1:peak_step + 1]))
    assert all(a >= b for a, b in zip(rates[peak_step:], rates[peak_step + 1:]))
    assert rates[-1] < 1e-7
