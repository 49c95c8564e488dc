"""benchmarks/: quality.py's results file (rows of lessons not run again are kept, in lesson order) and
floor_balance.py's class-balanced draws."""
import csv
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling common.py
from common import load_lesson  # noqa: E402  (loads any file of the repository by path)


def load_benchmark(name):
    return load_lesson(f"benchmarks/{name}.py")


def row(run, fd):
    return {"run": run, "command": f"python {run}", "fd": fd}


def test_results_accumulate_across_runs_and_stay_in_lesson_order(tmp_path, monkeypatch):
    quality = load_benchmark("quality")
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--lessons", "01", "03"])
    quality.write([row("03", "80"), row("03, w = 0", "99"), row("03, w = 4", "144"), row("01", "203")], "cpu")

    # A later invocation measures lessons 01 and 05 again: lesson 03 and its sweep are kept from the file.
    kept = quality.earlier_rows("cpu", ["01", "05"])
    assert [r["run"] for r in kept] == ["03", "03, w = 0", "03, w = 4"]
    quality.write(kept + [row("05", "35"), row("01", "190")], "cpu")

    with open(tmp_path / "quality_cpu.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["run"], r["fd"]) for r in rows] == [("01", "190"), ("03", "80"), ("03, w = 0", "99"),
                                                   ("03, w = 4", "144"), ("05", "35")]
    table = (tmp_path / "quality_cpu.md").read_text().splitlines()
    assert table[0].startswith("| run | command |") and len(table[0].split("|")) == len(quality.FIELDS) + 2
    assert [line.split("|")[1].strip() for line in table[2:7]] == ["01", "03", "03, w = 0", "03, w = 4", "05"]
    assert table[-1] == "Last command: python benchmarks/quality.py --lessons 01 03"

    # A recipe candidate under its own --results-tag: its own file, the default runs' table untouched.
    quality.write([row("02", "40")], "cpu_candidate")
    assert [r["run"] for r in quality.earlier_rows("cpu_candidate", [])] == ["02"]
    assert [r["run"] for r in quality.earlier_rows("cpu", [])] == ["01", "03", "03, w = 0", "03, w = 4", "05"]


def test_every_lesson_has_a_readme_command_and_lesson_04_samples_lesson_02s_model():
    quality = load_benchmark("quality")
    assert sorted(quality.LESSONS) == ["01", "02", "03", "04", "05"]
    for key, argv in quality.LESSONS.items():
        assert (ROOT / argv[0]).is_file() and argv[0].startswith(key)
        assert f"python {' '.join(argv)}".replace("{runs}", "outputs") in (ROOT / "README.md").read_text()


def test_balanced_draws_take_the_same_number_of_distinct_images_from_every_class():
    floor_balance = load_benchmark("floor_balance")
    labels = torch.tensor([0] * 30 + [1] * 7 + [2] * 13).repeat(2)  # unevenly mixed classes
    generator = torch.Generator().manual_seed(0)
    first = floor_balance.balanced_indices(labels, 15, generator, classes=3)
    assert len(set(first.tolist())) == 15 and torch.bincount(labels[first]).tolist() == [5, 5, 5]
    assert not torch.equal(first, floor_balance.balanced_indices(labels, 15, generator, classes=3))  # a new draw
    # each --count keeps its own results files: the README cites the 50- and the 250-image ones
    assert floor_balance.results_name("fashion-mnist", 50) == "floor_balance_fashion-mnist"
    assert floor_balance.results_name("fashion-mnist", 250) == "floor_balance_fashion-mnist_250"
    for name in ("floor_balance_fashion-mnist", "floor_balance_fashion-mnist_250"):
        assert (ROOT / "benchmarks" / "results" / f"{name}.md").exists()


def test_lesson01_recipe_samples_with_lesson01s_own_sampler_and_passes_min_snr_to_its_loss():
    """benchmarks/lesson01_recipe.py ranks recipes for lesson 01: its sampler must draw what lesson 01's sample()
    draws (the same starting noise, the posterior variance), and --min-snr must change the training (it trains
    with lesson01.loss_fn, whose min-SNR weights tests/test_lesson01_math.py checks against the formula)."""
    recipe = load_benchmark("lesson01_recipe")
    lesson01 = recipe.lesson01
    schedule = lesson01.make_schedule(torch.device("cpu"), 40)
    torch.manual_seed(0)
    model = lesson01.TinyUNet(1, width=8).eval()
    ours = recipe.draw(model, schedule, 3, "beta_tilde")
    theirs, _ = lesson01.sample(model, schedule, (3, 1, 28, 28), torch.Generator().manual_seed(recipe.SAMPLE_SEED))
    assert torch.allclose(ours, theirs, atol=1e-5)
    other = recipe.draw(model, schedule, 3, "beta")  # the same noises, a larger variance: other images
    assert (other - ours).abs().max() > 1e-3


    class Args:  # two steps of training on four images, with and without min-SNR
        steps, batch_size, width, lr, ema, seed = 2, 2, 8, 1e-3, 0.0, 0
        min_snr, arch, channels_last, prediction, timesteps = 0.0, "tiny", False, "eps", "uniform"
    images = torch.rand(4, 1, 28, 28) * 2 - 1

    def train():  # from the same initial weights each time (the script seeds them once, in main)
        torch.manual_seed(0)
        return recipe.train(Args, images, schedule)[0]
    plain = train()
    Args.min_snr = 5.0
    weighted = train()
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), weighted.state_dict().values()))
    Args.min_snr, Args.ema = 0.0, 0.9  # lesson 02's EMA: the averaged weights are returned, not the last ones
    averaged = train()
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), averaged.state_dict().values()))
    Args.ema, Args.channels_last = 0.0, True  # another memory layout, the same arithmetic: the same network after
    laid_out = train()  # training (its weights may differ where GroupNorm cancels them: Adam scales up rounding there)
    weight = laid_out.down1.conv1.weight  # [8, 8, 3, 3]: the two layouts differ (not for the 1-channel stem)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert plain.down1.conv1.weight.is_contiguous()
    x, t = torch.rand(3, 1, 28, 28) * 2 - 1, torch.tensor([5, 20, 39])
    assert torch.allclose(plain(x, t), laid_out(x, t), atol=1e-4)
    assert not torch.allclose(plain(x, t), weighted(x, t), atol=1e-4)
    Args.channels_last, Args.arch = False, "patch2"
    patched = train()
    assert isinstance(patched, recipe.Patch2UNet) and isinstance(plain, lesson01.TinyUNet)
    Args.arch, Args.prediction = "tiny", "v"  # trained on v_loss: another network from the same start
    predicts_v = train()
    assert not torch.allclose(plain(x, t), predicts_v(x, t), atol=1e-4)
    Args.prediction, Args.timesteps = "eps", "lognormal"  # EDM's noise levels: another network from the same start
    lognormal = train()
    assert not torch.allclose(plain(x, t), lognormal(x, t), atol=1e-4)


def test_lesson01_recipes_lognormal_timesteps_follow_edms_noise_level_distribution():
    """--timesteps lognormal: t is drawn so that sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) follows EDM's
    ln sigma ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1). Checked against draws of that normal each sent to the
    timestep whose ln sigma is nearest, and the loss must weight the drawn t as lesson01.loss_fn's min-SNR does."""
    recipe = load_benchmark("lesson01_recipe")
    schedule = recipe.make_schedule("linear")
    probs = recipe.lognormal_timestep_probs(schedule)
    assert probs.shape == (1000,) and (probs >= 0).all() and abs(probs.sum().item() - 1) < 1e-5
    log_sigma = 0.5 * torch.log((1 - schedule["alpha_bars"]) / schedule["alpha_bars"])
    drawn = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.2 - 1.2
    midpoints = (log_sigma[1:] + log_sigma[:-1]).double() / 2  # ln sigma increases with t: nearest = bin
    nearest = torch.searchsorted(midpoints, drawn)  # [200000] timesteps
    counts = torch.bincount(nearest, minlength=1000).double() / len(drawn)
    for upto in (10, 50, 88, 150, 325, 600):  # the cumulative shares agree to sampling error
        assert abs(counts[:upto].sum() - probs[:upto].double().sum()) < 0.005, upto
    median = int((probs.cumsum(0) >= 0.5).nonzero()[0])
    assert abs(log_sigma[median] - (-1.2)) < 0.02  # the median noise level is EDM's exp(P_mean) = 0.30
    assert probs[:500].sum() > 0.97  # and almost no training above t = 500, where uniform t spends half of it

    seen = []

    def zero(x_t, t):  # predicts no noise: the loss is the weight times the mean of eps^2
        seen.append(t)
        return torch.zeros_like(x_t)
    one_hot = torch.zeros(1000)
    one_hot[40] = 1.0
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    loss = recipe.lognormal_loss(zero, x0, schedule, torch.Generator().manual_seed(1), 5.0, one_hot)
    assert torch.equal(seen[0], torch.full((8,), 40))
    snr = schedule["alpha_bars"][40] / (1 - schedule["alpha_bars"][40])
    assert abs(loss / (5.0 / snr) - 1) < 0.05  # min(SNR, 5) / SNR at t = 40, times mean eps^2 over 6272 draws
    plain = recipe.lognormal_loss(zero, x0, schedule, torch.Generator().manual_seed(1), 0.0, one_hot)
    assert abs(plain - 1) < 0.05


def test_lesson01_recipes_v_prediction_is_lesson01s_objective_through_another_output():
    """--prediction v: a network predicting v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 implies the noise
    sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t (Salimans & Ho 2022). With min-SNR's weight for v,
    min(SNR, gamma) / (SNR + 1), v_loss must equal lesson01.loss_fn of that implied noise predictor on the same
    draws, and the sampler must draw the images the implied noise predictor draws; --schedule cosine is lesson 02's."""
    recipe = load_benchmark("lesson01_recipe")
    lesson01 = recipe.lesson01
    schedule = lesson01.make_schedule(torch.device("cpu"), 40)
    torch.manual_seed(0)
    v_model = lesson01.TinyUNet(1, width=8).eval()

    def implied_eps(x_t, t):
        alpha_bar = schedule["alpha_bars"][t].view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * v_model(x_t, t) + (1 - alpha_bar).sqrt() * x_t

    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    for gamma in (5.0, 0.5):
        ours = recipe.v_loss(v_model, x0, schedule, torch.Generator().manual_seed(3), gamma)
        theirs = lesson01.loss_fn(implied_eps, x0, schedule, torch.Generator().manual_seed(3), gamma)
        assert torch.allclose(ours, theirs, rtol=1e-5), gamma
    plain = recipe.v_loss(v_model, x0, schedule, torch.Generator().manual_seed(3), 0.0)  # the unweighted v loss
    assert not torch.allclose(plain, recipe.v_loss(v_model, x0, schedule, torch.Generator().manual_seed(3), 5.0))
    with torch.no_grad():
        drawn = recipe.draw(v_model, schedule, 3, "beta_tilde", "v")
        assert torch.allclose(drawn, recipe.draw(implied_eps, schedule, 3, "beta_tilde"), atol=1e-5)
        assert (drawn - recipe.draw(v_model, schedule, 3, "beta_tilde")).abs().max() > 1e-2  # read as eps: others
    cosine = recipe.make_schedule("cosine")
    assert torch.equal(cosine["alpha_bars"], recipe.lesson02.make_schedule("cosine", torch.device("cpu"))["alpha_bars"])
    assert torch.equal(recipe.make_schedule("linear")["betas"], lesson01.make_schedule(torch.device("cpu"))["betas"])


def test_lesson01_recipes_network_on_patches_sees_every_pixel_and_has_the_parameters_the_readme_gives():
    """--arch patch2 folds 2x2 patches into channels and back: one output pixel's gradient reaches every input
    pixel (nothing lost in the fold), and at width 32 it has 378k parameters against TinyUNet's 146k at 16."""
    recipe = load_benchmark("lesson01_recipe")
    torch.manual_seed(0)
    patched = recipe.Patch2UNet(1, 32)
    assert sum(p.numel() for p in patched.parameters()) == 378_308
    assert sum(p.numel() for p in recipe.lesson01.TinyUNet(1, 16).parameters()) == 146_337
    x = torch.randn(1, 1, 28, 28, requires_grad=True)
    out = patched(x, torch.tensor([500]))
    assert out.shape == x.shape
    out[0, 0, 27, 27].backward()
    assert (x.grad != 0).all()


def test_lesson01_recipes_middle_networks_add_one_module_at_7x7_to_tinyunet():
    """--arch attn7 and block7 are TinyUNet plus one module at 7x7 (lesson 02's SelfAttention, or a second Block):
    with TinyUNet's weights and the attention's zero-initialised output they compute TinyUNet's function exactly,
    the added module is on the path (changing its weights changes the output), and the parameter counts are the
    README's."""
    recipe = load_benchmark("lesson01_recipe")
    torch.manual_seed(0)
    tiny = recipe.lesson01.TinyUNet(1, 16).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    counts = {"attn7": 163_105, "block7": 224_609}
    for name, count in counts.items():
        middle = recipe.ARCHITECTURES[name](1, 16).eval()
        assert sum(p.numel() for p in middle.parameters()) == count
        missing, unexpected = middle.load_state_dict(tiny.state_dict(), strict=False)
        assert not unexpected and missing and all(key.startswith("extra.") for key in missing)
        with torch.no_grad():
            if name == "attn7":
                assert torch.allclose(middle(x, t), tiny(x, t), atol=1e-6)  # the attention starts as the identity
            for parameter in middle.extra.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
            assert (middle(x, t) - tiny(x, t)).abs().max() > 1e-3


def test_quality_refuses_an_unbalanced_guidance_sweep_and_a_reuse_with_nothing_to_score(tmp_path, monkeypatch, capsys):
    """--guidance-samples draws the same number of each of 10 classes, so it must be a multiple of 10; --reuse
    scores runs already made, and says which one is missing (one line, no traceback); neither writes results."""
    quality = load_benchmark("quality")
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    command = ["quality.py", "--runs", str(tmp_path / "runs"), "--results-tag", "test"]
    monkeypatch.setattr(sys, "argv", command + ["--guidance-samples", "25"])
    with pytest.raises(SystemExit) as refused:
        quality.main()
    error = capsys.readouterr().err
    assert refused.value.code == 2 and "a positive multiple of 10" in error and error.rstrip().endswith("got 25")
    monkeypatch.setattr(sys, "argv", command + ["--lessons", "01", "--reuse"])
    with pytest.raises(SystemExit) as missing:
        quality.main()
    assert missing.value.code == f"no {tmp_path / 'runs' / '01_ddpm_toy' / 'samples.npz'} to score: run this lesson " \
                                 "without --reuse first"
    assert not (tmp_path / "results").exists()
