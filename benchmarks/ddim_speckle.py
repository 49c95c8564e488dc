"""Where deterministic DDIM's speckled samples come from, measured on a trained lesson 02 checkpoint.

    python benchmarks/ddim_speckle.py --checkpoint outputs/02_ddpm/checkpoint.pt

1. The network's error on held-out test images at each timestep t: the RMS error of its eps (or v)
   output, and the RMS error of the x0 it implies, which eps-prediction multiplies by
   sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t) (34x at t = 980 on the cosine schedule).
2. How many samples are speckled: the share of samples whose total variation (the mean absolute
   difference between neighbouring pixels) exceeds that of 99% of real test images, for DDIM with
   eta = 0 and eta = 1 and for DPM-Solver++ at the same starting noises.
3. Along the deterministic (eta = 0) path: the total variation of the predicted x0 at each step, for
   the speckled samples and for the rest, which shows at which t the two part.
Writes benchmarks/results/ddim_speckle_<name>.md, where name is --name (default: the checkpoint's
prediction target).
"""
import argparse
import math

import torch

from common import RESULTS, load_lesson
from utils import data
from utils.runtime import pick_device

lesson04 = load_lesson("04_ddim_fast_sampling.py")
ERROR_TIMESTEPS = (0, 50, 100, 200, 300, 500, 700, 800, 900, 950, 980, 990, 999)
PATH_REPORT_TIMESTEPS = (999, 939, 799, 599, 399, 199, 99, 19)  # on the 50-step trailing path


def total_variation(images):
    """Mean absolute difference between horizontally and vertically adjacent pixels: [N, C, H, W] -> [N]."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().mean((1, 2, 3))
            + (images[..., :, 1:] - images[..., :, :-1]).abs().mean((1, 2, 3))) / 2


@torch.inference_mode()
def network_errors(model, alpha_bars, images, prediction, generator):
    """{t: (RMS error of the network's output, RMS error of the x0 it implies)} on `images` [N, C, H, W]."""
    errors = {}
    for t in ERROR_TIMESTEPS:
        alpha_bar = alpha_bars[t].item()
        eps = torch.randn(images.shape, generator=generator)
        x_t = math.sqrt(alpha_bar) * images + math.sqrt(1 - alpha_bar) * eps
        target = eps if prediction == "eps" else math.sqrt(alpha_bar) * eps - math.sqrt(1 - alpha_bar) * images
        output = model(x_t, torch.full((len(images),), t))
        # The same output read as x0 by the samplers' own helper (one network call for both errors).
        _, x0_pred = lesson04.predict_eps_and_x0(lambda *_: output, x_t, t, alpha_bar, prediction, clip_x0=False)
        errors[t] = ((output - target).pow(2).mean().sqrt().item(), (x0_pred - images).pow(2).mean().sqrt().item())
    return errors


@torch.inference_mode()
def path_variation(model, alpha_bars, x_T, prediction, steps=50):
    """Total variation of the clipped predicted x0 [N] at each step of DDIM-50 (eta = 0), as {t: [N]}."""
    constants = alpha_bars.tolist()
    x_t, variation = x_T, {}
    for t, t_prev in lesson04.timestep_pairs(steps, "trailing"):
        alpha_bar_prev = constants[t_prev] if t_prev >= 0 else 1.0
        eps_pred, x0_pred = lesson04.predict_eps_and_x0(model, x_t, t, constants[t], prediction)
        variation[t] = total_variation(x0_pred)
        x_t = lesson04.ddim_step(x_t, eps_pred, x0_pred, constants[t], alpha_bar_prev, 0.0, None)
    return variation


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="outputs/02_ddpm/checkpoint.pt")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    device = pick_device("cpu")
    model, config = lesson04.load_model(args.checkpoint, device)
    prediction = config.get("prediction", "eps")
    if prediction not in ("eps", "v"):
        raise SystemExit(f"{args.checkpoint} predicts {prediction}; this benchmark measures the speckle of eps and v "
                         f"models (benchmarks/flow_matching.py measures flow models)")
    alpha_bars = lesson04.make_schedule(config["schedule"], device)["alpha_bars"]
    test = data.load_dataset(config["dataset"], args.data_dir, split="test", download=False).images
    generator = torch.Generator().manual_seed(0)
    held_out = test[torch.randperm(len(test), generator=generator)[:512]]
    lines = [f"# Deterministic DDIM's speckle: {args.checkpoint} ({prediction}-prediction, {config['dataset']})", "",
             "## 1. The network's error on 512 held-out test images", "",
             f"| t | alpha_bar_t | RMS error of the {prediction} output | RMS error of the implied x0 |",
             "|---|---|---|---|"]
    for t, (output_error, x0_error) in network_errors(model, alpha_bars, held_out, prediction, generator).items():
        lines.append(f"| {t} | {alpha_bars[t].item():.3g} | {output_error:.4f} | {x0_error:.4f} |")
    threshold = torch.quantile(total_variation(test), 0.99).item()
    x_T = torch.randn((args.samples, config["channels"], config["image_size"], config["image_size"]),
                      generator=torch.Generator().manual_seed(1))
    lines += ["", f"## 2. Speckled samples: total variation above {threshold:.3f}, the 99th percentile of the "
                  f"{len(test)} test images", "", "| sampler | steps | speckled share |", "|---|---|---|"]
    for sampler, steps, eta in (("ddim", 50, 0.0), ("ddim", 50, 1.0), ("dpm-solver++", 20, 0.0)):
        images, _ = lesson04.sample(model, alpha_bars, x_T, steps, sampler, eta, prediction=prediction,
                                    generator=torch.Generator().manual_seed(2))
        share = (total_variation(images) > threshold).float().mean().item()
        label = f"DDIM, eta = {eta:g}" if sampler == "ddim" else "DPM-Solver++(2M)"
        lines.append(f"| {label} | {steps} | {share:.3f} ({round(share * args.samples)} of {args.samples}) |")
        if sampler == "ddim" and eta == 0.0:
            speckled = total_variation(images) > threshold
    variation = path_variation(model, alpha_bars, x_T, prediction)
    lines += ["", "## 3. Total variation of the predicted x0 along the DDIM-50 (eta = 0) path", "",
              "| t | speckled samples (mean) | the others (mean) |", "|---|---|---|"]
    for t in PATH_REPORT_TIMESTEPS:
        rest = variation[t][~speckled].mean().item()
        spotted = variation[t][speckled].mean().item() if speckled.any() else float("nan")
        lines.append(f"| {t} | {spotted:.3f} | {rest:.3f} |")
    lines += ["", f"Real test images: median total variation {total_variation(test).median().item():.3f}. "
                  f"Command: python benchmarks/ddim_speckle.py --checkpoint {args.checkpoint}"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"ddim_speckle_{args.name or prediction}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
