"""DDPM against DDIM on one trained model: wall time, speed-up and quality per step count.

    python examples/compare_methods.py --checkpoint outputs/02_ddpm/checkpoint.pt

Samples the same images (the same starting noises, the same batch size) with lesson 02's ancestral
sampler in 1000 steps and with lesson 04's DDIM sampler in 10, 20, 50 and 100 steps, then scores each
set with utils.metrics: the Frechet distance to the test split in a small classifier's feature space
(not Inception-FID), next to the distance that as many real training images reach (the floor), and the
entropy of the predicted classes. Prints a table and writes, to --out (default
outputs/compare_methods/): compare.csv, compare.md and compare.png (the first 8 starting noises, one
column per method).
"""
import argparse
import csv
import math
import importlib.util
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: lessons and utils live one folder up

from utils import metrics, visualize  # noqa: E402
from utils.runtime import ArgumentParser, pick_device, positive_int, run, writable_dir  # noqa: E402

FIGURE_ROWS = 8


def load_lesson(filename):
    """Import a lesson file (its name starts with a digit, so `import` cannot)."""
    spec = importlib.util.spec_from_file_location(Path(filename).stem, ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lesson02 = load_lesson("02_ddpm.py")
lesson04 = load_lesson("04_ddim_fast_sampling.py")


def step_counts(text):
    """argparse type: '10,20,50' -> (10, 20, 50), each between 1 and T."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of step counts") from None
    if not counts or min(counts) < 1 or max(counts) > lesson04.T:
        raise argparse.ArgumentTypeError(f"step counts must lie in 1..{lesson04.T}, got {text!r}")
    return counts


def eta_values(text):
    """argparse type: '0,0.5,1' -> (0.0, 0.5, 1.0), each finite and at least 0."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(value) and value >= 0 for value in values):
        raise argparse.ArgumentTypeError(f"every eta must be a finite number of at least 0, got {text!r}")
    return values


def parse_args(argv=None):
    parser = ArgumentParser(description="Compare DDPM (1000 steps) with DDIM (few steps) on one checkpoint.")
    parser.add_argument("--checkpoint", default="outputs/02_ddpm/checkpoint.pt", help="a lesson 02 or 04 checkpoint")
    parser.add_argument("--steps", type=step_counts, default=(10, 20, 50, 100), help="DDIM step counts")
    parser.add_argument("--eta", type=eta_values, default=(0.0,),
                        help="DDIM's eta (Eq. 16), or several: '0,0.5,1' gives a row per step count and eta "
                             "(the DDIM paper's Table 1 uses 0, 0.2, 0.5, 1)")
    parser.add_argument("--num-samples", type=positive_int, default=256,
                        help="images per method (FD needs a few hundred; DDPM-1000 costs about 1.5 s per image "
                             "on a 2-core CPU)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per network call, every method")
    parser.add_argument("--no-metrics", action="store_true", help="time only; skip utils.metrics")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--out", type=writable_dir, default=Path("outputs/compare_methods"), help="output folder")
    return parser.parse_args(argv)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def draw(method, steps, eta, model, config, noises, args, device):
    """All of `noises` [N, C, H, W] sampled in batches: (images on the CPU, seconds)."""
    schedule = lesson02.make_schedule(config["schedule"], device)
    alpha_bars = lesson04.make_alpha_bars(config["schedule"], device)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # the noise added along the way
    images = []
    synchronize(device)
    started = time.perf_counter()
    for batch in noises.split(args.batch_size):
        batch = batch.to(device)
        if method == "DDPM":
            # Lesson 02's sampler draws x_T itself; replay it through its steps instead, from this x_T.
            # Lesson 02's defaults: the posterior variance, x0 clipped (as DDIM clips it here).
            constants = lesson02.sampling_constants(schedule, "posterior")
            x_t = batch
            for t in tqdm(range(lesson02.T - 1, -1, -1), desc=f"DDPM {lesson02.T} steps", leave=False):
                x_t, _ = lesson02.sample_step(model, x_t, t, constants, generator, True)
            images.append(x_t.clamp(-1, 1).cpu())
        else:
            images.append(lesson04.ddim_sample(model, alpha_bars, batch, steps, eta, "uniform", generator)[0].cpu())
    synchronize(device)
    return torch.cat(images), time.perf_counter() - started


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model, config = lesson04.load_model(args.checkpoint, device)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_metrics:
        # Load (or train) the classifier first: a missing dataset should stop us before the long sampling.
        metrics.load_classifier(config["dataset"], args.data_dir, device=device)
    shape = (args.num_samples, config["channels"], config["image_size"], config["image_size"])
    noises = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    methods = [("DDPM", lesson02.T, "")] + [("DDIM", steps, eta) for eta in args.eta for steps in args.steps]
    rows, columns = [], []
    for method, steps, eta in methods:
        images, seconds = draw(method, steps, eta, model, config, noises, args, device)
        row = {"method": method, "steps": steps, "eta": eta,
               "seconds": round(seconds, 2), "speedup": round(rows[0]["seconds"] / seconds, 1) if rows else 1.0}
        if not args.no_metrics:
            scores = metrics.evaluate(images, config["dataset"], data_dir=args.data_dir, device=device)
            row.update(fd=scores["fd"], fd_real_floor=scores["fd_real_floor"],
                       class_entropy_bits=scores["class_entropy_bits"])
        print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
        rows.append(row)
        columns.append(images[:FIGURE_ROWS])
    write_outputs(rows, columns, args, config, device)


def write_outputs(rows, columns, args, config, device):
    with open(args.out / "compare.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    headers = ["method", "steps", "eta", "wall time", "speed-up"]
    if "fd" in rows[0]:
        headers += ["FD (lower is better)", "FD of real images (floor)", "class entropy, bits"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["method"], row["steps"], row["eta"], f"{row['seconds']:.1f} s", f"{row['speedup']:.1f}x"]
        if "fd" in row:
            cells += [f"{row['fd']:.2f}", f"{row['fd_real_floor']:.2f}", f"{row['class_entropy_bits']:.2f}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    lines += ["", f"{args.num_samples} images per method, batch {args.batch_size}, {config['dataset']}, on "
                  f"{machine}, torch {torch.__version__}. FD: utils.metrics (a small classifier's features, not "
                  f"Inception-FID)."]
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    labels = [f"{row['method']} {row['steps']}" + (f", eta {row['eta']:g}" if len(args.eta) > 1 and row["eta"] != ""
                                                  else "") for row in rows]
    figure = torch.stack(columns, dim=1).flatten(0, 1)
    path = visualize.save_labeled_grid(figure, [str(i) for i in range(len(columns[0]))], labels,
                                       args.out / "compare.png", row_title="starting noise")
    for name in ("compare.csv", "compare.md"):
        print(f"wrote {args.out / name}")
    print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
