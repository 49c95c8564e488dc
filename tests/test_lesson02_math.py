"""Lesson 02's mathematics against the papers: schedules, posterior, sampler, network and EMA."""
import math

import pytest
import torch

from conftest import load_lesson


@pytest.fixture(scope="module")
def lesson02():
    return load_lesson("02_ddpm.py")


def test_linear_schedule_matches_ho_et_al(lesson02):
    schedule = lesson02.make_schedule("linear", "cpu")
    betas = schedule["betas"].double()
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas[1:] - betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    for t in (0, 10, 500, 999):
        product = math.prod(1 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t + 1))
        assert schedule["alpha_bars"][t].item() == pytest.approx(product, rel=1e-5)


@pytest.mark.parametrize("timesteps", [25, 500, 2000])
def test_another_T_draws_each_schedule_over_T_steps(lesson02, timesteps):
    """--timesteps T: the linear betas run from 1e-4 x 1000/T to 0.02 x 1000/T (as improved-diffusion scales DDPM's
    schedule), the cosine schedule is Improved DDPM Eq. 17 with t/T; both end with alpha_bar near 0."""
    linear = lesson02.make_schedule("linear", "cpu", timesteps)["betas"].double()
    scale = 1000 / timesteps
    expected = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)
    assert torch.allclose(linear, expected, rtol=1e-5, atol=1e-8)

    def f(t):
        return math.cos((t / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
    cosine = lesson02.make_schedule("cosine", "cpu", timesteps)
    reference = torch.tensor([min(0.999, 1 - f(t + 1) / f(t)) for t in range(timesteps)], dtype=torch.float64)
    assert torch.allclose(cosine["betas"].double(), reference, rtol=1e-5, atol=1e-7)
    for name in ("linear", "cosine"):
        assert lesson02.make_schedule(name, "cpu", timesteps)["alpha_bars"][-1].item() < 1e-3


def test_cosine_schedule_matches_improved_ddpm_eq_17(lesson02):
    schedule = lesson02.make_schedule("cosine", "cpu")

    def f(t):  # Improved DDPM Eq. 17 with s = 0.008, T = 1000
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 1, 100, 500, 900, 990):  # code index t is the paper's t + 1
        assert schedule["alpha_bars"][t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5, abs=1e-7)
        assert schedule["betas"][t].item() == pytest.approx(min(0.999, 1 - f(t + 1) / f(t)), rel=1e-5)
    betas = schedule["betas"]
    assert betas.max().item() == pytest.approx(0.999)  # clipped at the end, as Section 3.2 says
    assert (betas[1:] >= betas[:-1]).all()  # noise is added ever faster
    # The cosine schedule destroys information more slowly than the linear one in the middle.
    linear = lesson02.make_schedule("linear", "cpu")
    assert schedule["alpha_bars"][500] > 5 * linear["alpha_bars"][500]
    assert all(value.dtype == torch.float32 for value in schedule.values())


def reference_betas(name):
    if name == "linear":
        return torch.tensor([1e-4 + (0.02 - 1e-4) * t / 999 for t in range(1000)], dtype=torch.float64)

    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(0.999, 1 - f(t + 1) / f(t)) for t in range(1000)], dtype=torch.float64)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(lesson02, name):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): a product of two Gaussians in x_{t-1}."""
    schedule = lesson02.make_schedule(name, "cpu")
    betas = reference_betas(name)  # float64 from the papers' formulas, independent of the lesson's code
    generator = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    for t in (1, 2, 50, 400, 999):
        beta = betas[t]
        alpha = 1 - beta
        alpha_bar_prev = torch.prod(1 - betas[:t])
        # q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta): precision alpha / beta, pulling towards x_t / sqrt(alpha);
        # q(x_{t-1} | x_0) = N(sqrt(alpha_bar_prev) x_0, 1 - alpha_bar_prev).
        precision = alpha / beta + 1 / (1 - alpha_bar_prev)
        variance = 1 / precision
        mean = variance * (alpha.sqrt() * x_t.double() / beta + alpha_bar_prev.sqrt() * x0.double() / (1 - alpha_bar_prev))
        coded = schedule["posterior_x0_weights"][t] * x0 + schedule["posterior_xt_weights"][t] * x_t
        assert torch.allclose(coded.double(), mean, rtol=1e-4, atol=1e-6), t
        assert schedule["posterior_variances"][t].item() == pytest.approx(variance.item(), rel=1e-4)
    assert schedule["posterior_variances"][0].item() == 0  # at the last step x_0 is known
    assert schedule["posterior_x0_weights"][0].item() == pytest.approx(1.0)


def test_posterior_mean_with_predicted_x0_is_eq_11(lesson02):
    """Without clipping, the Eq. 7 mean at x0_pred(eps) equals Eq. 11's mean written with eps directly."""
    schedule = lesson02.make_schedule("cosine", "cpu")
    constants = lesson02.sampling_constants(schedule, "posterior")
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def model(x_t, t):
        return eps

    x_t = torch.randn(2, 1, 4, 4)
    for t in (0, 10, 500, 900):
        beta, alpha, alpha_bar = (schedule[key][t].item() for key in ("betas", "alphas", "alpha_bars"))
        eq_11 = (x_t - beta / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha)
        x_prev, _ = lesson02.sample_step(model, x_t, t, constants, torch.Generator().manual_seed(3), clip_x0=False)
        # The same generator seed gives the same z, so x_prev - eq_11 is sigma_t z exactly (no noise at t = 0).
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
        sigma = math.sqrt(schedule["posterior_variances"][t].item()) if t > 0 else 0.0
        assert torch.allclose(x_prev, eq_11 + sigma * z, atol=1e-4), t


def test_variance_choices(lesson02):
    schedule = lesson02.make_schedule("linear", "cpu")
    large = lesson02.sampling_constants(schedule, "beta")["sigmas"]
    small = lesson02.sampling_constants(schedule, "posterior")["sigmas"]
    assert large[500] == pytest.approx(math.sqrt(schedule["betas"][500].item()))
    assert small[500] == pytest.approx(math.sqrt(schedule["posterior_variances"][500].item()))
    assert all(s <= b + 1e-9 for s, b in zip(small, large))  # beta_tilde_t <= beta_t


def test_clipping_keeps_predicted_x0_in_range(lesson02):
    schedule = lesson02.make_schedule("cosine", "cpu")
    constants = lesson02.sampling_constants(schedule, "posterior")
    x_t = 3 * torch.ones(1, 1, 4, 4)
    _, x0_pred = lesson02.sample_step(lambda x, t: torch.zeros_like(x), x_t, 10, constants, None, clip_x0=True)
    assert x0_pred.max().item() == 1.0
    _, unclipped = lesson02.sample_step(lambda x, t: torch.zeros_like(x), x_t, 10, constants, None, clip_x0=False)
    assert unclipped.min().item() > 2.9


def test_oracle_sampler_reaches_the_data_point(lesson02):
    """With a network that knows x0 exactly, T posterior steps from pure noise end at x0."""
    schedule = lesson02.make_schedule("cosine", "cpu")
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    alpha_bars = schedule["alpha_bars"]

    def oracle(x_t, t):  # the eps that makes x_t = sqrt(ab) x0 + sqrt(1 - ab) eps hold exactly
        alpha_bar_t = alpha_bars[t].view(-1, 1, 1, 1)
        return (x_t - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).sqrt()

    images, _ = lesson02.sample(oracle, schedule, x0.shape, torch.Generator().manual_seed(0))
    assert torch.allclose(images, x0, atol=1e-3)


def test_unet_shapes_for_mnist_and_cifar(lesson02):
    mnist = lesson02.UNet(channels=1, width=16, channel_mults=(1, 2, 2), num_res_blocks=1)
    x = torch.randn(2, 1, 28, 28)
    assert mnist(x, torch.tensor([0, 999])).shape == (2, 1, 28, 28)
    # CIFAR-10 shape with the paper's four resolutions 32 -> 16 -> 8 -> 4 and two blocks each.
    cifar = lesson02.UNet(channels=3, width=16, channel_mults=(1, 2, 2, 2), num_res_blocks=2, dropout=0.1)
    assert cifar(torch.randn(2, 3, 32, 32), torch.tensor([3, 700])).shape == (2, 3, 32, 32)
    attention_sizes = set()
    hooks = [module.register_forward_hook(lambda m, i, o: attention_sizes.add(o.shape[-1]))
             for module in cifar.modules() if isinstance(module, lesson02.SelfAttention)]
    cifar(torch.randn(1, 3, 32, 32), torch.tensor([5]))
    for hook in hooks:
        hook.remove()
    assert attention_sizes == {16, 4}  # the 16x16 level, as in DDPM, and the middle


def test_paper_sized_cifar_model_has_the_papers_parameter_count(lesson02):
    """DDPM Appendix B: the CIFAR-10 model has 35.7 million parameters."""
    model = lesson02.UNet(channels=3, width=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, dropout=0.1)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(35.7, abs=0.1)


def test_unet_depends_on_t_once_trained_a_step(lesson02):
    torch.manual_seed(0)
    model = lesson02.UNet(channels=1, width=8, channel_mults=(1, 2), num_res_blocks=1)
    x = torch.randn(2, 1, 8, 8)
    # Zero-initialised output layers: an untrained network predicts exactly 0 (loss starts at 1).
    assert model(x, torch.tensor([1, 1])).abs().max().item() == 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        lesson02.loss_fn(model, x, lesson02.make_schedule("cosine", "cpu"), None).backward()
        optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([900, 900])))


def test_ema_update_rule(lesson02):
    model = torch.nn.Linear(3, 2)
    ema = lesson02.EMA(model, decay=0.99)
    start = {name: value.clone() for name, value in ema.model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert ema.decay_at(0) == pytest.approx(1 / 10)  # warm-up: (1 + step) / (10 + step)
    assert ema.decay_at(50) == pytest.approx(51 / 60)
    assert ema.decay_at(10**6) == 0.99
    ema.update(model, step=10**6)
    for name, value in model.state_dict().items():
        expected = 0.99 * start[name] + 0.01 * value
        assert torch.allclose(ema.model.state_dict()[name], expected, atol=1e-6)
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_training_lowers_the_loss(lesson02):
    torch.manual_seed(0)
    x0 = torch.zeros(32, 1, 8, 8)
    x0[:, :, 2:6, 2:6] = 1
    x0 = x0 * 2 - 1
    model = lesson02.UNet(channels=1, width=8, channel_mults=(1, 2), num_res_blocks=1)
    schedule = lesson02.make_schedule("cosine", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    def mean_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return sum(lesson02.loss_fn(model, x0, schedule, g).item() for _ in range(10)) / 10

    before = mean_loss()
    for _ in range(80):  # measured: the loss falls to 0.10 of where it started (0.13 after 60 steps)
        optimizer.zero_grad()
        lesson02.loss_fn(model, x0, schedule, generator).backward()
        optimizer.step()
    after = mean_loss()
    assert before == pytest.approx(1.0, abs=0.1)
    assert after < 0.5 * before


def test_mixed_precision_only_on_cuda(lesson02):
    cpu = torch.device("cpu")
    assert lesson02.mixed_precision("auto", cpu) is None
    assert lesson02.mixed_precision("fp32", cpu) is None
    with pytest.raises(lesson02.LessonError, match="needs a CUDA device"):
        lesson02.mixed_precision("bf16", cpu)


def test_v_prediction_target_and_sampler_match_salimans_and_ho(lesson02):
    """--prediction v: the loss's target is v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022,
    Section 4), and the sampler reads x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v back. A network that knows
    x0 and answers with the exact v has zero loss under v and not under eps, and the reverse for exact eps."""
    schedule = lesson02.make_schedule("cosine", "cpu")
    alpha_bars = schedule["alpha_bars"]
    x0 = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def rates(t):
        alpha_bar_t = alpha_bars[t].view(-1, 1, 1, 1)
        return alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()

    def exact_eps(x_t, t):
        signal_rate, noise_rate = rates(t)
        return (x_t - signal_rate * x0) / noise_rate

    def exact_v(x_t, t):  # v = a eps - s x0 with eps = (x_t - a x0) / s, a^2 + s^2 = 1
        signal_rate, noise_rate = rates(t)
        return (signal_rate * x_t - x0) / noise_rate

    losses = {(target, oracle.__name__): lesson02.loss_fn(oracle, x0, schedule, torch.Generator().manual_seed(1),
                                                           target).item()
              for target in ("eps", "v") for oracle in (exact_eps, exact_v)}
    assert losses["eps", "exact_eps"] < 1e-6 and losses["v", "exact_v"] < 1e-6, losses
    assert losses["eps", "exact_v"] > 0.1 and losses["v", "exact_eps"] > 0.1, losses
    constants = lesson02.sampling_constants(schedule, "posterior")
    for t in (999, 500, 3):
        x_t = lesson02.add_noise(x0, torch.full((64,), t), torch.randn(x0.shape), schedule)
        _, x0_pred = lesson02.sample_step(exact_v, x_t, t, constants, None, clip_x0=False, prediction="v")
        assert torch.allclose(x0_pred, x0, atol=1e-4), t
