"""Plant one-line bugs in each lesson's own copies and see which test catches each (not a test file itself).

    python tests/planted_bugs.py            # every bug: about 10-20 minutes on a 2-core CPU
    python tests/planted_bugs.py kl-sign    # one of them, by name

For each bug: replace one line fragment in one file, run that lesson's tests with `pytest -x`, put the file
back, and report the first failing test (or SURVIVED). Prints a Markdown table. The working tree is restored
even if the run is interrupted. Add a row to BUGS when a lesson gains a copy worth checking.
"""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, exact fragment, its buggy replacement, test files to run)
BUGS = [
    ("01 forward noise without sqrt", "01_ddpm_toy.py", "(1.0 - alpha_bar_t).sqrt() * eps", "(1.0 - alpha_bar_t) * eps",
     ["tests/test_lesson01_math.py"]),
    ("01 sigma_t^2 = beta_tilde_t, no sqrt", "01_ddpm_toy.py", "math.sqrt(posterior_variance) * torch.randn",
     "posterior_variance * torch.randn", ["tests/test_lesson01_math.py"]),
    ("01 min-SNR weight not divided by SNR", "01_ddpm_toy.py", "snr_t.clamp(max=snr_gamma) / snr_t * per_image",
     "snr_t.clamp(max=snr_gamma) * per_image", ["tests/test_lesson01_math.py"]),
    ("01 Eq. 11 coefficient without sqrt", "01_ddpm_toy.py", "betas[t] / math.sqrt(1.0 - alpha_bars[t])",
     "betas[t] / (1.0 - alpha_bars[t])", ["tests/test_lesson01_math.py"]),
    ("02 posterior variance = beta_t", "02_ddpm.py", '"posterior_variances": (1 - alpha_bars_prev) / (1 - alpha_bars) * betas',
     '"posterior_variances": betas', ["tests/test_lesson02_math.py"]),
    ("02 v target sign", "02_ddpm.py", "target = alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0",
     "target = alpha_bar_t.sqrt() * eps + (1 - alpha_bar_t).sqrt() * x0", ["tests/test_lesson02_math.py"]),
    ("02 EMA decay direction", "02_ddpm.py", "average.lerp_(value, 1 - decay)", "average.lerp_(value, decay)",
     ["tests/test_lesson02_math.py"]),
    ("02 sample-only with the raw weights", "02_ddpm.py", 'model.load_state_dict(checkpoint["ema"])',
     'model.load_state_dict(checkpoint["model"])', ["tests/test_lesson02_cli.py"]),
    ("03 guidance weights swapped", "03_conditional_ddpm.py", "(1 + w) * eps_cond - w * eps_uncond",
     "(1 + w) * eps_uncond - w * eps_cond", ["tests/test_lesson03.py"]),
    ("03 labels dropped with 1 - p_uncond", "03_conditional_ddpm.py", "< p_uncond", "> p_uncond",
     ["tests/test_lesson03.py"]),
    ("03 EMA decay direction", "03_conditional_ddpm.py", "average.lerp_(value, 1 - decay)",
     "average.lerp_(value, decay)", ["tests/test_lesson03.py"]),
    ("03 EMA warm-up off", "03_conditional_ddpm.py", "return min(self.decay, (1 + step) / (EMA_WARMUP + step))",
     "return self.decay", ["tests/test_lesson03.py"]),
    ("03 posterior variance = beta_t", "03_conditional_ddpm.py",
     '"posterior_variances": (1 - alpha_bars_prev) / (1 - alpha_bars) * betas', '"posterior_variances": betas',
     ["tests/test_lesson03.py"]),
    ("03 sample-only with the raw weights", "03_conditional_ddpm.py", 'model.load_state_dict(checkpoint["ema"])',
     'model.load_state_dict(checkpoint["model"])', ["tests/test_lesson03.py"]),
    ("04 DDIM sigma without a sqrt", "04_ddim_fast_sampling.py",
     "* math.sqrt(1 - alpha_bar_t / alpha_bar_prev)", "* (1 - alpha_bar_t / alpha_bar_prev)",
     ["tests/test_lesson04.py"]),
    ("04 DDIM direction ignores sigma", "04_ddim_fast_sampling.py", "max(0.0, 1 - alpha_bar_prev - sigma ** 2)",
     "max(0.0, 1 - alpha_bar_prev)", ["tests/test_lesson04.py"]),
    ("04 DPM-Solver++ 1/r for 1/(2r)", "04_ddim_fast_sampling.py",
     "x0_estimate = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * x0_last",
     "x0_estimate = (1 + 1 / r) * x0_pred - 1 / r * x0_last", ["tests/test_lesson04.py"]),
    ("04 eps from v, sign", "04_ddim_fast_sampling.py", "eps_pred = noise_rate * x_t + signal_rate * output",
     "eps_pred = noise_rate * x_t - signal_rate * output", ["tests/test_lesson04.py"]),
    ("04 EMA decay direction", "04_ddim_fast_sampling.py", "average.lerp_(value, 1 - decay)",
     "average.lerp_(value, decay)", ["tests/test_lesson04.py"]),
    ("04 samples with the raw weights", "04_ddim_fast_sampling.py", 'model.load_state_dict(checkpoint["ema"])',
     'model.load_state_dict(checkpoint["model"])', ["tests/test_lesson04.py"]),
    ("05 KL sign of log sigma^2", "05_latent_diffusion.py", "logvar.exp() - 1 - logvar)", "logvar.exp() - 1 + logvar)",
     ["tests/test_lesson05.py"]),
    ("05 KL subtracted in the loss", "05_latent_diffusion.py", "return l1 + kl_weight * kl_divergence",
     "return l1 - kl_weight * kl_divergence", ["tests/test_lesson05.py"]),
    ("05 reparameterised with the variance", "05_latent_diffusion.py", "z = mean + (0.5 * logvar).exp() * torch.randn",
     "z = mean + logvar.exp() * torch.randn", ["tests/test_lesson05.py"]),
    ("05 decoded without unscaling", "05_latent_diffusion.py", "autoencoder.decode(z0 / scale).clamp(-1, 1), kept",
     "autoencoder.decode(z0 * scale).clamp(-1, 1), kept", ["tests/test_lesson05.py"]),
    ("05 trained on unscaled latents", "05_latent_diffusion.py", "z0 = (means[batch] + stds[batch] * noise) * scale",
     "z0 = means[batch] + stds[batch] * noise", ["tests/test_lesson05.py"]),
    ("05 EMA decay direction", "05_latent_diffusion.py", "average.lerp_(value, 1 - decay)",
     "average.lerp_(value, decay)", ["tests/test_lesson05.py"]),
    ("05 EMA warm-up off", "05_latent_diffusion.py", "return min(self.decay, (1 + step) / (EMA_WARMUP + step))",
     "return self.decay", ["tests/test_lesson05.py"]),
    ("05 DDIM sigma without a sqrt", "05_latent_diffusion.py",
     "sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))",
     "sigma = eta * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)",
     ["tests/test_lesson05.py"]),
    ("metrics FD: sqrt of S_a S_b elementwise", "utils/metrics.py", "middle = root_a @ cov_b @ root_a",
     "middle = cov_a * cov_b", ["tests/test_metrics.py"]),
    ("metrics FD: tr sqrt counted once", "utils/metrics.py", "- 2 * trace_sqrt", "- trace_sqrt",
     ["tests/test_metrics.py"]),
    ("04 a DDIM step in float64", "04_ddim_fast_sampling.py", "    return x_prev\n", "    return x_prev.double().float()\n",
     ["tests/test_lesson04.py"]),
    ("utils reverse-process noise left on the CPU", "utils/visualize.py",
     ".to(reference.device, reference.dtype)", "", ["tests/test_visualize.py"]),
]


def first_failure(output):
    for line in output.splitlines():
        if line.startswith("FAILED") or line.startswith("ERROR"):
            return line.split()[1].split(" - ")[0]
    return None


def main(names):
    chosen = [bug for bug in BUGS if not names or bug[0] in names or any(name in bug[0] for name in names)]
    rows = []
    for name, filename, fragment, replacement, tests in chosen:
        path = ROOT / filename
        original = path.read_text()
        count = original.count(fragment)
        if count != 1:
            rows.append((name, filename, f"fragment found {count} times: fix BUGS"))
            continue
        try:
            path.write_text(original.replace(fragment, replacement))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=ROOT, capture_output=True, text=True)
            caught = first_failure(done.stdout) if done.returncode else None
            rows.append((name, filename, f"caught by {caught} ({time.perf_counter() - started:.0f} s)" if caught
                         else "SURVIVED"))
        finally:
            path.write_text(original)
        print(f"{name}: {rows[-1][2]}", flush=True)
    print("\n| planted bug | file | result |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if any(row[2] == "SURVIVED" or row[2].startswith("fragment") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
