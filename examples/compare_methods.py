"""DDPM against DDIM, DPM-Solver++, Euler and Heun on one trained model: wall time, speed-up and quality per step
count.

    python examples/compare_methods.py --checkpoint outputs/02_ddpm/checkpoint.pt

Samples the same starting noises with lesson 02's ancestral sampler in 1000 steps (the first
--ddpm-samples of them: it costs 1000 network calls per image) and with lesson 04's fast samplers (--samplers:
DDIM, DPM-Solver++(2M), Euler, Heun) at each of --steps network calls (all --num-samples), then scores each set with
utils.metrics: the Frechet distance (FD) to the test split in a small classifier's features (not
Inception-FID), the distance that as many real training images reach (the floor, which depends on the
count), FD minus the floor, and that excess as a multiple of DDPM-1000's. Lesson 02 checkpoints trained
with --prediction v or flow are sampled as such by every method. Writes, to --out (default
outputs/compare_methods/): compare.csv, compare.md and compare.png (the first 8 starting noises, one
column per method).
"""
import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: lessons and utils live one folder up

from examples.lessons import load_lesson  # noqa: E402
from utils import data, metrics, visualize  # noqa: E402
from utils.runtime import (  # noqa: E402
    SAMPLE_BATCH_SIZE, ArgumentParser, LessonError, check_steps, make_out_dir, pick_device, positive_int, run,
    saved_timesteps, writable_dir,
)

FIGURE_ROWS = 8


lesson02 = load_lesson("02_ddpm.py")
lesson04 = load_lesson("04_ddim_fast_sampling.py")


def step_counts(text):
    """argparse type: '10,20,50' -> (10, 20, 50), each at least 1 (and at most T: checked against the checkpoint)."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of step counts") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be at least 1, got {text!r}")
    return counts


def sampler_names(text):
    """argparse type: 'ddim,dpm-solver++' -> ('ddim', 'dpm-solver++'), each one of lesson 04's samplers."""
    names = tuple(part.strip() for part in text.split(","))
    unknown = [name for name in names if name not in lesson04.SAMPLER_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"samplers are {', '.join(lesson04.SAMPLER_NAMES)}, got {text!r}")
    return names


def eta_values(text):
    """argparse type: '0,0.5,1' -> (0.0, 0.5, 1.0), each in [0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(value) and 0 <= value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"every eta must lie in [0, 1] (DDIM Eq. 16 and 12), got {text!r}")
    return values


def parse_args(argv=None):
    parser = ArgumentParser(description="Compare DDPM (1000 steps) with DDIM and DPM-Solver++ on one checkpoint.")
    parser.add_argument("--checkpoint", default="outputs/02_ddpm/checkpoint.pt", help="a lesson 02 or 04 checkpoint")
    parser.add_argument("--steps", type=step_counts, default=(10, 20, 50, 100),
                        help="network calls of the fast samplers (Heun: (calls + 1) // 2 steps)")
    parser.add_argument("--samplers", type=sampler_names, default=("ddim", "dpm-solver++"),
                        help="fast samplers, comma-separated, of lesson 04's: ddim (with each --eta), dpm-solver++, "
                             "euler (the same as ddim with eta 0, on purpose: lesson 04) and heun")
    parser.add_argument("--eta", type=eta_values, default=(0.0,),
                        help="DDIM's eta (Eq. 16), or several: '0,0.5,1' gives a row per step count and eta "
                             "(the DDIM paper's Table 1 uses 0, 0.2, 0.5, 1)")
    parser.add_argument("--timestep-spacing", choices=lesson04.TIMESTEP_SPACINGS, default=None,
                        help="timesteps of the fast samplers (diffusers' names; lesson 04); default: each sampler's "
                             "own (trailing for ddim, logsnr for dpm-solver++; flow_time for all on a flow "
                             "checkpoint)")
    parser.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                        help="clip the fast samplers' predicted x0 to [-1, 1]; default as lesson 04: on for eps-, off "
                             "for v-prediction (DDPM-1000 always clips, as lesson 02 does)")
    parser.add_argument("--num-samples", type=positive_int, default=1000,
                        help="images per fast sampler (FD ranks methods from about 1000)")
    parser.add_argument("--ddpm-samples", type=positive_int, default=256,
                        help="images for DDPM-1000, the first of the same noises (1.9-2.5 s per image measured on a "
                             "2-core CPU: docs/lesson04.md 'Sampling many images'; at most --num-samples)")
    parser.add_argument("--batch-size", type=positive_int, default=SAMPLE_BATCH_SIZE,
                        help="images per network call, every method")
    parser.add_argument("--no-metrics", action="store_true", help="time only; skip utils.metrics")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--out", type=writable_dir, default=Path("outputs/compare_methods"), help="output folder")
    args = parser.parse_args(argv)
    if any(args.eta) and "ddim" not in args.samplers:
        parser.error(f"--eta is DDIM's noise, and --samplers {','.join(args.samplers)} has no ddim: the others are "
                     f"deterministic; add ddim or drop --eta")
    if args.ddpm_samples > args.num_samples:
        parser.error(f"--ddpm-samples ({args.ddpm_samples}) must be at most --num-samples ({args.num_samples}): "
                     f"DDPM draws from the same noises")
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def draw(sampler, steps, eta, model, config, noises, args, device):
    """All of `noises` [N, C, H, W] sampled in batches by "ddpm" or one of lesson 04's samplers:
    (images on the CPU, seconds)."""
    prediction = config.get("prediction", "eps")
    schedule = lesson02.make_schedule(config["schedule"], device, config["timesteps"])
    alpha_bars = lesson04.make_schedule(config["schedule"], device, config["timesteps"])["alpha_bars"]
    constants = lesson02.sampling_constants(schedule, "posterior")  # lesson 02's defaults: the posterior variance
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # the noise added along the way
    images = []
    synchronize(device)
    started = time.perf_counter()
    for batch in tqdm(noises.split(args.batch_size), desc=f"{sampler} {steps}", unit="batch", leave=False):
        batch = batch.to(device)
        if sampler == "ddpm":
            # Lesson 02's sampler draws x_T itself; replay it through its steps instead, from this x_T,
            # with x0 clipped, as lesson 02 does by default.
            x_t = batch
            for t in range(config["timesteps"] - 1, -1, -1):
                x_t, _ = lesson02.sample_step(model, x_t, t, constants, generator, True, prediction)
            images.append(x_t.clamp(-1, 1).cpu())
        else:
            images.append(lesson04.sample(model, alpha_bars, batch, steps, sampler, eta or 0.0, args.timestep_spacing,
                                          prediction, args.clip_x0, generator=generator)[0].cpu())
    synchronize(device)
    return torch.cat(images), time.perf_counter() - started


def method_list(args, timesteps):
    """(sampler, steps, eta, images) of every row: DDPM (all T steps) first, then each fast sampler at each step
    count."""
    methods = [("ddpm", timesteps, "", args.ddpm_samples)]
    if "ddim" in args.samplers:
        methods += [("ddim", steps, eta, args.num_samples) for eta in args.eta for steps in args.steps]
    for sampler in ("dpm-solver++", "euler", "heun"):
        if sampler in args.samplers:
            methods += [(sampler, steps, "", args.num_samples) for steps in args.steps]
    return methods


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model, config = lesson04.load_model(args.checkpoint, device)
    config["timesteps"] = saved_timesteps(config, None, args.checkpoint)
    check_steps(max(args.steps), config["timesteps"], args.checkpoint)
    make_out_dir(args.out)
    if not args.no_metrics:
        if config["dataset"] not in data.DATASETS:
            raise LessonError(f"{args.checkpoint} was trained on an image folder, which utils.metrics cannot score "
                              f"(it knows {', '.join(data.DATASETS)}); pass --no-metrics to compare the samplers' "
                              f"time and pictures")
        # Load (or train) the classifier first: a missing dataset should stop us before the long sampling.
        metrics.load_classifier(config["dataset"], args.data_dir, device=device)
    shape = (args.num_samples, config["channels"], config["image_size"], config["image_size"])
    noises = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    rows, columns = [], []
    for sampler, steps, eta, count in method_list(args, config["timesteps"]):
        images, seconds = draw(sampler, steps, eta, model, config, noises[:count], args, device)
        spacing = "" if sampler == "ddpm" else lesson04.spacing_for(sampler, args.timestep_spacing,
                                                                    config.get("prediction", "eps"))
        row = {"method": lesson04.SAMPLER_NAMES.get(sampler, "DDPM"), "steps": steps, "eta": eta, "spacing": spacing,
               "samples": count,
               "seconds": round(seconds, 2), "seconds_per_image": round(seconds / count, 4)}
        row["speedup"] = round(rows[0]["seconds_per_image"] / row["seconds_per_image"], 1) if rows else 1.0
        if not args.no_metrics:
            scores = metrics.evaluate(images, config["dataset"], data_dir=args.data_dir, device=device)
            row.update(fd=scores["fd"], fd_real_floor=scores["fd_real_floor"],
                       fd_above_floor=round(scores["fd"] - scores["fd_real_floor"], 2),
                       class_entropy_bits=scores["class_entropy_bits"])
            # FD - floor as a multiple of DDPM-1000's; meaningless when DDPM's own sits at or below its floor.
            ddpm_excess = rows[0]["fd_above_floor"] if rows else row["fd_above_floor"]
            row["vs_ddpm"] = round(row["fd_above_floor"] / ddpm_excess, 2) if ddpm_excess > 0 else ""
        print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
        rows.append(row)
        columns.append(images[:FIGURE_ROWS])
    write_outputs(rows, columns, args, config, device)


def write_outputs(rows, columns, args, config, device):
    with open(args.out / "compare.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    headers = ["method", "steps", "eta", "timestep spacing", "images", "wall time", "per image", "speed-up"]
    if "fd" in rows[0]:
        headers += ["FD", "floor", "FD - floor", "vs DDPM", "class entropy, bits"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["method"], row["steps"], row["eta"], row["spacing"], row["samples"], f"{row['seconds']:.1f} s",
                 f"{1000 * row['seconds_per_image']:.0f} ms", f"{row['speedup']:.1f}x"]
        if "fd" in row:
            cells += [f"{row['fd']:.2f}", f"{row['fd_real_floor']:.2f}", f"{row['fd_above_floor']:.2f}",
                      f"{row['vs_ddpm']:.2f}x" if row["vs_ddpm"] != "" else "", f"{row['class_entropy_bits']:.2f}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    prediction = config.get("prediction", "eps")
    clipped = "clipped" if lesson04.clip_for(prediction, args.clip_x0) else "not clipped"
    lines += ["", f"Batch {args.batch_size}, {config['dataset']}, {prediction}-prediction, the fast samplers' x0 "
                  f"{clipped} (DDPM's clipped), on {machine}, torch {torch.__version__}. FD: "
                  f"utils.metrics (a small classifier's features, not Inception-FID); the floor is the FD of as many "
                  f"real training images, so it differs between rows with different image counts."]
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    labels = [f"{row['method'].split('(')[0]} {row['steps']}" + (f", eta {row['eta']:g}" if len(args.eta) > 1 and
                                                                 row["method"] == "DDIM" else "") for row in rows]
    shown = min(len(column) for column in columns)  # DDPM may have drawn fewer images than the rest
    figure = torch.stack([column[:shown] for column in columns], dim=1).flatten(0, 1)
    path = visualize.save_labeled_grid(figure, [str(i) for i in range(shown)], labels,
                                       args.out / "compare.png", row_title="starting noise")
    for name in ("compare.csv", "compare.md"):
        print(f"wrote {args.out / name}")
    print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
