"""Flow matching beside eps and v: lesson 02's flow target and loss, lesson 04's conversion, Euler and Heun, and flow
checkpoints in every tool that reads lesson 02's."""
import csv
import math
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, load_lesson, run_in_process
from test_lesson04 import gaussian_denoiser

TINY_FLOW = ["--max-steps", "3", "--width", "8", "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "1",
             "--timesteps", "25", "--prediction", "flow"]


@pytest.fixture(scope="module")
def lesson02():
    return load_lesson("02_ddpm.py")


@pytest.fixture(scope="module")
def lesson04():
    return load_lesson("04_ddim_fast_sampling.py")


def exact_outputs(x0, eps, alpha_bar):
    """What a perfect network of each target answers at x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (float64):
    eps; v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0; flow's velocity eps - x0."""
    return {"eps": eps, "v": math.sqrt(alpha_bar) * eps - math.sqrt(1 - alpha_bar) * x0, "flow": eps - x0}


def test_a_perfect_predictor_of_each_target_gives_eps_and_x0_exactly(lesson04):
    """The conversion, for each target, at noise levels from almost clean to pure noise; and what the network is
    shown: a flow model gets x_t's twin (1 - s) x0 + s eps on the straight path, at s x 1000."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"].double().tolist()
    for t in (0, 10, 300, 700, 999):
        alpha_bar = alpha_bars[t]
        x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps
        s = lesson04.flow_time(alpha_bar)
        assert s == pytest.approx(math.sqrt(1 - alpha_bar) / (math.sqrt(alpha_bar) + math.sqrt(1 - alpha_bar)))
        for prediction, output in exact_outputs(x0, eps, alpha_bar).items():
            eps_pred, x0_pred = lesson04.to_eps_and_x0(output, x_t, alpha_bar, prediction)
            assert torch.allclose(eps_pred, eps, atol=1e-9) and torch.allclose(x0_pred, x0, atol=1e-9), (t, prediction)
            shown, time = lesson04.network_input(x_t, t, alpha_bar, prediction)
            if prediction == "flow":
                assert torch.allclose(shown, (1 - s) * x0 + s * eps, atol=1e-12)
                assert torch.allclose(time, torch.full((3,), s * 1000, dtype=time.dtype))
            else:
                assert shown is x_t and time.tolist() == [t] * 3
    with pytest.raises(ValueError, match="unknown prediction target 'x0'"):
        lesson04.to_eps_and_x0(eps, eps, 0.5, "x0")


def test_the_flow_ends_are_the_image_and_the_noise(lesson04):
    assert lesson04.flow_time(1.0) == 0.0 and lesson04.flow_time(0.0) == 1.0 and lesson04.flow_time(0.5) == 0.5
    assert lesson04.flow_scale(1.0) == 1.0 and lesson04.flow_scale(0.5) == pytest.approx(math.sqrt(2))


def test_guidance_on_the_velocity_is_guidance_on_eps_after_conversion(lesson04):
    """Classifier-free guidance mixes a conditional and an unconditional output, b + g (a - b); the conversion is
    linear in the output with weights of x_t and alpha_bar only, so mixing then converting is converting then mixing,
    for every target (and so lesson 03's guided eps and a guided velocity are the same sampler)."""
    generator = torch.Generator().manual_seed(1)
    x_t, a, b = (torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    for prediction in ("eps", "v", "flow"):
        for alpha_bar in (0.9, 0.3, 0.002):
            for g in (1.0, 3.0, 7.5):
                guided = lesson04.to_eps_and_x0(b + g * (a - b), x_t, alpha_bar, prediction)
                (eps_a, x0_a), (eps_b, x0_b) = (lesson04.to_eps_and_x0(o, x_t, alpha_bar, prediction) for o in (a, b))
                assert torch.allclose(guided[0], eps_b + g * (eps_a - eps_b), atol=1e-10)
                assert torch.allclose(guided[1], x0_b + g * (x0_a - x0_b), atol=1e-10)


def test_ddim_at_eta_0_is_the_euler_step_of_the_flow_ode(lesson04):
    """DDIM Eq. 12 with eta = 0 and one Euler step x_s' = x_s + (s' - s) v of the flow ODE, in the flow twin's
    variables, are the same update to float precision, for every target; and so are whole samplers."""
    generator = torch.Generator().manual_seed(2)
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"].double()
    x_t, output = (torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    constants = alpha_bars.tolist()
    for prediction in ("eps", "v", "flow"):
        for t, t_prev in ((999, 899), (500, 450), (30, 0), (9, -1)):
            alpha_bar_t, alpha_bar_prev = constants[t], constants[t_prev] if t_prev >= 0 else 1.0
            eps_pred, x0_pred = lesson04.to_eps_and_x0(output, x_t, alpha_bar_t, prediction)  # in float64
            ddim = lesson04.ddim_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev, 0.0, None)
            euler = lesson04.euler_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev)
            assert torch.allclose(ddim, euler, atol=1e-12, rtol=1e-9), (prediction, t, t_prev)
            # the same step written on the straight path itself
            s, s_prev = lesson04.flow_time(alpha_bar_t), lesson04.flow_time(alpha_bar_prev)
            x_s = x_t / lesson04.flow_scale(alpha_bar_t)
            assert torch.allclose(euler / lesson04.flow_scale(alpha_bar_prev),
                                  x_s + (s_prev - s) * (eps_pred - x0_pred), atol=1e-12, rtol=1e-9)
    torch.manual_seed(0)
    model = lesson04.UNet(1, 8, (1, 2), 1).eval()
    for parameter in model.parameters():  # a network that answers something: the zero-initialised head would not
        parameter.data += 0.05 * torch.randn_like(parameter)
    x_T = torch.randn(2, 1, 8, 8)
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    for prediction in ("v", "flow"):
        ddim, _ = lesson04.sample(model, alpha_bars, x_T, 10, "ddim", prediction=prediction, clip_x0=False)
        euler, _ = lesson04.sample(model, alpha_bars, x_T, 10, "euler", prediction=prediction, clip_x0=False)
        assert torch.allclose(ddim, euler, atol=1e-5) and ddim.std() > 0.05, prediction


def test_heun_converges_to_the_exact_ode_solution_faster_than_euler(lesson04):
    """For Gaussian data the probability-flow ODE has a closed form (tests/test_lesson04.py). Euler is first order:
    twice the steps, half the error; Heun second order on its default linspace grid (ending at t = 0): several
    times less, and in 19 network calls nearer the exact end point than Euler in 100. On trailing timesteps its
    last, uncorrected step is a long Euler step from t = T/steps - 1, which spoils the order."""
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    mean, std = 0.3, 0.5
    model = gaussian_denoiser(alpha_bars, mean, std)
    x_T = torch.randn(500, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    alpha_bar_T = alpha_bars[-1].item()
    exact = (mean + std * (x_T - alpha_bar_T ** 0.5 * mean) / (alpha_bar_T * std ** 2 + 1 - alpha_bar_T) ** 0.5)

    def error(sampler, calls, spacing=None):
        images, _ = lesson04.sample(model, alpha_bars, x_T, calls, sampler, spacing=spacing, clip_x0=False)
        return (images - exact.clamp(-1, 1)).abs().max().item()

    errors = {(sampler, calls): error(sampler, calls) for sampler, calls in
              (("euler", 20), ("euler", 40), ("euler", 100), ("heun", 9), ("heun", 19))}
    assert 1.6 < errors["euler", 20] / errors["euler", 40] < 2.5, errors  # first order
    assert errors["heun", 9] / errors["heun", 19] > 4, errors  # second order: measured 8.4
    assert errors["heun", 19] < 0.25 * errors["euler", 100], errors  # measured 0.0020 against 0.0255
    assert error("heun", 19, "trailing") > 10 * errors["heun", 19]  # the long uncorrected last step
    assert lesson04.solver_steps("heun", 39) == 20 and lesson04.network_calls("heun", 20) == 39
    assert lesson04.solver_steps("heun", 10) == 5 and lesson04.solver_steps("euler", 10) == 10


def test_heun_asks_the_network_twice_per_step_but_the_last(lesson04):
    calls = []

    def model(x_t, t):
        calls.append(float(t[0]))
        return torch.zeros_like(x_t)

    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    lesson04.sample(model, alpha_bars, torch.randn(1, 1, 4, 4), 9, "heun", prediction="flow")
    assert len(calls) == 9  # 5 steps
    assert calls == sorted(calls, reverse=True) and calls[0] == pytest.approx(lesson04.flow_time(
        alpha_bars[-1].item()) * 1000)
    with pytest.raises(ValueError, match="deterministic"):
        lesson04.sample(model, alpha_bars, torch.randn(1, 1, 4, 4), 4, "heun", eta=0.5)


def test_flow_loss_is_the_straight_path_and_its_velocity(lesson02):
    """x_t = (1 - t) x0 + t eps, the target eps - x0, the network told t x 1000: a network that knows x0 and eps
    answers with zero loss; the eps and v losses of that network do not vanish."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 1, 4, 4, generator=generator) * 2 - 1
    seen = {}

    def exact_velocity(x_t, time):  # recovers t from what it is told, then eps from x_t
        t = (time / 1000).view(-1, 1, 1, 1)
        seen["time"] = time
        eps = (x_t - (1 - t) * x0) / t
        return eps - x0

    for scheme in ("logit_normal", "none"):
        loss = lesson02.loss_fn(exact_velocity, x0, None, torch.Generator().manual_seed(1), "flow", scheme)
        assert loss.item() < 1e-8, scheme
        assert 0 < seen["time"].min() and seen["time"].max() < 1000
    schedule = lesson02.make_schedule("cosine", "cpu")
    assert lesson02.loss_fn(lambda x_t, t: torch.zeros_like(x_t), x0, schedule, torch.Generator().manual_seed(1),
                            "flow").item() == pytest.approx(1 + x0.pow(2).mean().item(), rel=0.1)  # E|eps - x0|^2
    with pytest.raises(ValueError, match="unknown weighting scheme"):
        lesson02.flow_time_sample(4, generator, "cpu", "mode")


def test_logit_normal_times_follow_sd3(lesson02):
    """logit(t) ~ N(0, 1) (Esser et al. 2024, Section 3.1): median 0.5, P(t < 0.25) = Phi(logit 0.25) = 0.1360;
    none is uniform."""
    generator = torch.Generator().manual_seed(0)
    t = lesson02.flow_time_sample(200_000, generator, "cpu", "logit_normal")
    phi = 0.5 * (1 + math.erf(math.log(0.25 / 0.75) / math.sqrt(2)))
    assert abs(t.median().item() - 0.5) < 0.005 and abs((t < 0.25).float().mean().item() - phi) < 0.003
    u = lesson02.flow_time_sample(200_000, generator, "cpu", "none")
    assert abs((u < 0.25).float().mean().item() - 0.25) < 0.003


def test_lesson04s_copy_of_the_flow_loss_is_lesson02s(lesson02, lesson04):
    torch.manual_seed(0)
    model = lesson04.UNet(1, 8, (1, 2), 1)
    for parameter in model.parameters():
        parameter.data += 0.05 * torch.randn_like(parameter)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    ours = lesson04.loss_fn(model, x0, alpha_bars, torch.Generator().manual_seed(3), "flow")
    theirs = lesson02.loss_fn(model, x0, None, torch.Generator().manual_seed(3), "flow", "logit_normal")
    assert ours.item() == theirs.item() and ours.item() > 0


def test_lesson02s_sampler_reads_a_flow_model(lesson02):
    """Lesson 02's posterior step asks a flow model at x_t's twin and gets x0 back exactly from a perfect one."""
    schedule = lesson02.make_schedule("cosine", "cpu")
    constants = lesson02.sampling_constants(schedule, "posterior")
    x0 = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for t in (999, 400, 2):
        x_t = lesson02.add_noise(x0, torch.full((4,), t), eps, schedule)
        _, x0_pred = lesson02.sample_step(lambda x, time: eps - x0, x_t, t, constants, None, clip_x0=False,
                                          prediction="flow")
        assert torch.allclose(x0_pred, x0, atol=1e-4), t


def test_a_tiny_flow_model_trained_here_samples_the_training_images(lesson02, lesson04):
    """Ten pictures (a bright square at ten places), a small U-Net trained with lesson 02's flow loss: Euler and
    Heun from fresh noise land near one of the ten, and several different ones; the untrained network does not."""
    torch.manual_seed(0)
    patterns = torch.full((10, 1, 12, 12), -1.0)
    for label in range(10):
        top, left = divmod(label, 5)
        patterns[label, :, 2 + 4 * top:6 + 4 * top, 1 + 2 * left:5 + 2 * left] = 1.0
    model = lesson02.UNet(channels=1, width=16, channel_mults=(1, 2), num_res_blocks=1)
    alpha_bars = lesson04.make_schedule("cosine", "cpu")["alpha_bars"]
    x_T = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(5))

    def nearest(sampler):
        images, _ = lesson04.sample(model.eval(), alpha_bars, x_T, 20, sampler, prediction="flow")
        distances = torch.cdist(images.flatten(1), patterns.flatten(1)) / 12  # RMS per pixel
        return distances.min(dim=1)

    untrained = nearest("euler").values
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(300):
        loss = lesson02.loss_fn(model, patterns[torch.randint(0, 10, (64,), generator=generator)], None, generator,
                                "flow")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-50:]) < 0.5 * sum(losses[:50])
    for sampler in ("euler", "heun"):
        near = nearest(sampler)
        assert near.values.median() < 0.25 and len(set(near.indices.tolist())) >= 5, (sampler, near)
    assert untrained.median() > 0.5, untrained


def test_flow_checkpoints_are_read_by_every_tool(tiny_data_dir, tmp_path, lesson02, lesson04, capsys):
    """A lesson 02 flow checkpoint: lesson 02 samples it again, lesson 04 with each sampler, compare_methods and
    edit_images sample and edit with it, and ddim_speckle, which measures eps and v only, refuses it in one line."""
    from PIL import Image

    l02 = tmp_path / "l02"
    result = run_in_process(lesson02.main, "02_ddpm.py", "--data-dir", tiny_data_dir, "--out", l02, *TINY_FLOW,
                            capsys=capsys)
    assert result.returncode == 0, result.stderr
    checkpoint = l02 / "checkpoint.pt"
    config = torch.load(checkpoint, weights_only=True)["config"]
    assert config["prediction"] == "flow" and config["weighting_scheme"] == "logit_normal"
    result = run_in_process(lesson02.main, "02_ddpm.py", "--sample-only", "--checkpoint", checkpoint, "--out",
                            tmp_path / "again", "--num-samples", "2", capsys=capsys)
    assert result.returncode == 0, result.stderr
    for sampler in ("heun", "dpm-solver++"):
        out = tmp_path / f"l04_{sampler}"
        result = run_in_process(lesson04.main, "04_ddim_fast_sampling.py", "--checkpoint", checkpoint, "--data-dir",
                                tiny_data_dir, "--out", out, "--steps", "5", "--num-samples", "2", "--sampler", sampler,
                                capsys=capsys)
        assert result.returncode == 0, result.stderr
        assert "flow-prediction" in result.stdout and np.load(out / "samples.npz")["images"].shape == (2, 28, 28, 1)
    assert "Heun, 3 steps = 5 network calls" in result.stdout or sampler != "heun"
    compare = load_lesson("examples/compare_methods.py")
    result = run_in_process(compare.main, "compare_methods.py", "--checkpoint", checkpoint, "--steps", "2,3",
                            "--samplers", "ddim,euler,heun", "--num-samples", "2", "--ddpm-samples", "1",
                            "--no-metrics", "--device", "cpu", "--out", tmp_path / "compare", capsys=capsys)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert "flow-prediction" in table and "| Heun | 3 |" in table and "| Euler | 2 |" in table
    edit = load_lesson("examples/edit_images.py")
    picture = tmp_path / "shirt.png"
    Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8)).save(picture)
    result = run_in_process(edit.main, "edit_images.py", "sdedit", "--checkpoint", checkpoint, "--out",
                            tmp_path / "edits", "--steps", "5", "--count", "2", "--data-dir", tiny_data_dir, "--input",
                            picture, "--strength", "0.5", capsys=capsys)
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks import their sibling common.py
    speckle = load_lesson("benchmarks/ddim_speckle.py")
    with pytest.raises(SystemExit, match="predicts flow; this benchmark measures"):
        speckle.main(["--checkpoint", str(checkpoint)])


def test_flow_flags_are_refused_where_they_cannot_act(lesson02, lesson04, capsys):
    from conftest import assert_refused
    assert_refused(lesson02.parse_args, ["--weighting-scheme", "none"], "it needs --prediction flow, not v", capsys)
    assert_refused(lesson04.parse_args, ["--sampler", "heun", "--eta", "0.5"], "Heun is deterministic", capsys)
    assert_refused(lesson04.parse_args, ["--sampler", "dpm-solver++", "--eta", "1"],
                   "DPM-Solver++(2M) is deterministic", capsys)


def test_flow_benchmark_trains_each_target_once_and_scores_every_sampler_and_call_count(tmp_path, monkeypatch,
                                                                                       learnable_mnist_classifier):
    """benchmarks/flow_matching.py end to end with tiny runs: lesson 02 trains each target into RUNS/target (and a
    second invocation reuses the finished checkpoints), every sampler is scored at every call count by utils.metrics
    with its floor at the same count, and the table, CSV, figure and the 10-call verdict are written."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    benchmark = load_lesson("benchmarks/flow_matching.py")
    monkeypatch.setattr(benchmark, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(benchmark, "METRICS_CACHE", learnable_mnist_classifier["cache_dir"])
    runs, data_dir = tmp_path / "runs", learnable_mnist_classifier["data_dir"]
    argv = ["--targets", "v,flow", "--calls", "1,10", "--samples", "6", "--ddpm-samples", "4", "--runs", str(runs),
            "--data-dir", str(data_dir), "--device", "cpu", "--results-tag", "test",
            "--train-args", "--max-steps 3 --width 8 --channel-mults 1,2 --batch-size 16 --num-samples 1 --timesteps 25"]
    benchmark.main(argv)
    for target in ("v", "flow"):
        saved = torch.load(runs / target / "checkpoint.pt", weights_only=True)
        assert saved["config"]["prediction"] == target and saved["step"] == 3
    with open(tmp_path / "results" / "flow_matching_test.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    expected = [(target, "ddpm", "25", "4") for target in ("v", "flow")]  # DDPM: all 25 timesteps, first
    expected = [row for target, ddpm in zip(("v", "flow"), expected) for row in
                [ddpm] + [(target, sampler, str(calls), "6") for sampler in benchmark.SAMPLERS for calls in (1, 10)]]
    assert [(r["target"], r["sampler"], r["calls"], r["samples"]) for r in rows] == expected
    assert [r["steps"] for r in rows if r["sampler"] == "heun"] == ["1", "5"] * 2  # Heun: 2 steps - 1 calls
    for r in rows:
        assert float(r["fd_minus_floor"]) == pytest.approx(float(r["fd"]) - float(r["floor"]), abs=0.011)
    floors = {r["samples"]: r["floor"] for r in rows}
    assert all(r["floor"] == floors[r["samples"]] for r in rows) and floors["4"] != floors["6"]
    table = (tmp_path / "results" / "flow_matching_test.md").read_text()
    assert "| flow | Heun |" in table and "| v | DDIM = Euler |" in table and "Best at 10 calls: " in table
    assert table.count("trained here") == 1 and "no: checkpoint reused" not in table
    assert (tmp_path / "results" / "flow_matching_test.png").stat().st_size > 0
    before = (runs / "flow" / "checkpoint.pt").stat().st_mtime_ns
    benchmark.main(argv)  # the finished runs are reused, not trained again (table: 3 samplers + straightness per target)
    assert (runs / "flow" / "checkpoint.pt").stat().st_mtime_ns == before
    assert table.count("| v |") == 4 and "no: checkpoint reused" in \
        (tmp_path / "results" / "flow_matching_test.md").read_text()
    # --samplers, --timestep-spacing and --no-straightness act: only the samplers named, each on the spacing named
    # (not its own), no straightness and no DDPM-1000
    spaced = [*argv[:argv.index("--results-tag")], "--results-tag", "spaced", "--samplers", "euler,heun",
              "--timestep-spacing", "trailing", "--no-straightness"]
    spaced[spaced.index("--ddpm-samples") + 1] = "0"
    samplers_module, used = benchmark.compare.lesson04, []
    original_pairs = samplers_module.timestep_pairs
    monkeypatch.setattr(samplers_module, "timestep_pairs", lambda steps, spacing="trailing", alpha_bars=None: (
        used.append(spacing), original_pairs(steps, spacing, alpha_bars))[1])
    benchmark.main(spaced)
    assert used and set(used) == {"trailing"}  # every fast sampler's steps (not straightness': not measured)
    with open(tmp_path / "results" / "flow_matching_spaced.csv", newline="") as file:
        again = list(csv.DictReader(file))
    assert [(r["target"], r["sampler"], r["calls"]) for r in again] == [
        (target, sampler, calls) for target in ("v", "flow") for sampler in ("euler", "heun") for calls in ("1", "10")]
    table = (tmp_path / "results" / "flow_matching_spaced.md").read_text()
    assert table.count("not measured") == 2 and "--timestep-spacing trailing --no-straightness" in table
    assert "| flow | Euler |" in table and "DDIM" not in table
