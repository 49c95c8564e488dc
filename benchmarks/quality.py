"""Each lesson's default run, end to end: wall time, peak memory, training speed and sample quality.

    python benchmarks/quality.py                          # every lesson, as README "The lessons" runs it, scored at
                                                          # NUM_SAMPLES (about 2.5 h on 2 CPU cores)
    python benchmarks/quality.py --lessons 01 02          # some of them
    python benchmarks/quality.py --lessons 03 --reuse     # score runs already in --runs without training again

Runs each lesson's command of README "The lessons" as its own process (output folder --runs/<lesson>), with
--num-samples set to NUM_SAMPLES (so its wall time includes drawing that many, not the default 64), then scores the
samples.npz it wrote with utils.metrics against the dataset's test split, beside the real-data floor at
the same sample count (the Frechet distance of as many real training images). Peak memory is the
process's maximum resident set size. Lesson 04 samples lesson 02's checkpoint, so it needs lesson 02's run.
For lesson 03 it also sweeps the guidance strength w on the trained model: the same starting noises and
labels at every w, class accuracy (the classifier's agreement with the requested label) and distance.
Writes benchmarks/results/quality_cpu.csv and .md (quality_TAG with --results-tag TAG, for a recipe candidate)
after every lesson, so a stopped run keeps what it measured; rows of lessons not run this time are kept from the
last results file of that tag.
"""
import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, ROOT, load_lesson
from utils import metrics
from utils.runtime import load_checkpoint, positive_int

LESSONS = {  # each lesson's default command (README "The lessons"), without --out
    "01": ["01_ddpm_toy.py"],
    "02": ["02_ddpm.py"],
    "03": ["03_conditional_ddpm.py"],
    "04": ["04_ddim_fast_sampling.py", "--checkpoint", "{runs}/02_ddpm/checkpoint.pt"],
    "05": ["05_latent_diffusion.py"],
}
LESSON_NAMES = {key: Path(argv[0]).stem for key, argv in LESSONS.items()}
# --num-samples of each lesson's run: 1000 where sampling is fast enough; 256 for the 1000-step DDPM samplers of
# lessons 02 and 03 (1000 of lesson 03's guided images would take over an hour on 2 CPU cores). Lesson 01 is a
# 1000-step sampler too, but its small network draws 1000 in 7 to 12 minutes.
NUM_SAMPLES = {"01": 1000, "02": 256, "03": 256, "04": 1000, "05": 1000}
FIELDS = ("run", "command", "wall_min", "peak_rss_gib", "train_images_per_s", "final_loss", "samples",
          "fd", "fd_real_floor", "class_accuracy", "class_entropy_bits")


def run_lesson(argv, log_path):
    """Run one lesson command; return (wall seconds, peak resident memory in GiB). Raises on failure."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory, not the benchmark's
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed; see {log_path}")
    return seconds, usage.ru_maxrss / 2 ** 20  # Linux reports KiB


def last_metrics_row(out):
    path = out / "metrics.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return rows[-1] if rows else {}


def guidance_sweep(run_dir, weights, count, seed):
    """Lesson 03's trained model at each w: the same noises and balanced labels; scores per w."""
    lesson = load_lesson("03_conditional_ddpm.py")
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt", lesson.LESSON)
    config = checkpoint["config"]
    model = lesson.build_model(config)
    model.load_state_dict(checkpoint["ema"])
    model.eval()
    schedule = lesson.make_schedule(torch.device("cpu"))
    labels = torch.arange(count) % lesson.NUM_CLASSES
    shape = (count, config["channels"], config["image_size"], config["image_size"])
    rows = []
    for w in weights:
        generator = torch.Generator().manual_seed(seed)
        x_T = torch.randn(shape, generator=generator)
        started = time.perf_counter()
        with torch.inference_mode():
            images, _ = lesson.sample(model, schedule, labels, w, x_T, generator)
        seconds = time.perf_counter() - started
        result = metrics.evaluate(images, config["dataset"], labels=labels)
        rows.append({"run": f"03, w = {w:g}", "command": f"(sweep on the lesson 03 model, {seconds / 60:.1f} min)",
                     "samples": count, **{key: result.get(key, "") for key in FIELDS if key in result}})
        print(rows[-1], flush=True)
    return rows


def earlier_rows(tag, lessons):
    """Rows of the last results file for lessons this run does not measure again (results accumulate)."""
    path = RESULTS / f"quality_{tag}.csv"
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return [row for row in csv.DictReader(file) if row["run"][:2] not in lessons]


def write(rows, tag):
    rows = sorted(rows, key=lambda row: row["run"][:2])  # stable: a lesson's sweep stays after its own row
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"quality_{tag}"
    with open(stem.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    header = ["run", "command", "wall (min)", "peak memory (GiB)", "training images/s", "final loss", "samples",
              "FD", "FD floor (real)", "class accuracy", "class entropy (bits)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key in FIELDS) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + f"\n\nLast command: python benchmarks/quality.py "
                                       f"{shlex.join(sys.argv[1:])}\n")
    print(f"wrote {stem.with_suffix('.md')}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lessons", nargs="+", default=list(LESSONS), choices=list(LESSONS))
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "benchmark_runs", help="output folders")
    parser.add_argument("--reuse", action="store_true", help="score existing runs; do not train again")
    parser.add_argument("--guidance", default="0,1,2,4", help="lesson 03's sweep: guidance strengths w")
    parser.add_argument("--guidance-samples", type=int, default=50,
                        help="images per w (a multiple of 10; 0: no sweep)")
    parser.add_argument("--num-samples", type=positive_int, default=None,
                        help="images each lesson samples and is scored on (default: NUM_SAMPLES, 1000 or 256)")
    parser.add_argument("--extra", default="", help="flags added to every lesson command (a quick check, or a recipe "
                                                    "candidate: then give it its own --results-tag)")
    parser.add_argument("--results-tag", default="cpu", help="results go to benchmarks/results/quality_TAG.csv and .md "
                                                             "(default cpu: the default runs' table)")
    args = parser.parse_args()
    if args.guidance_samples < 0 or args.guidance_samples % 10:
        parser.error(f"--guidance-samples must be 0 or a positive multiple of 10 (the same number of each class), "
                     f"got {args.guidance_samples}")
    print(f"command: python benchmarks/quality.py {shlex.join(sys.argv[1:])}", flush=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    rows = earlier_rows(args.results_tag, args.lessons)
    for key in args.lessons:
        template = LESSONS[key]
        out = args.runs / Path(template[0]).stem
        count = args.num_samples or NUM_SAMPLES[key]
        argv = ([part.format(runs=args.runs) for part in template] + ["--out", str(out), "--num-samples", str(count)]
                + args.extra.split())
        row = {"run": key, "command": "python " + " ".join(template).replace("{runs}", "outputs")
               + f" --num-samples {count}" + (f" {args.extra}" if args.extra else "")}
        if not args.reuse:
            print(f"running {' '.join(argv)}", flush=True)
            seconds, peak = run_lesson(argv, args.runs / f"{key}.log")
            row.update(wall_min=f"{seconds / 60:.1f}", peak_rss_gib=f"{peak:.2f}")
        if not (out / "samples.npz").is_file():
            raise SystemExit(f"no {out / 'samples.npz'} to score: run this lesson without --reuse first")
        last = last_metrics_row(out)
        row.update(train_images_per_s=last.get("images_per_s", ""), final_loss=last.get("loss", ""))
        arrays = np.load(out / "samples.npz")
        labels = arrays["labels"] if "labels" in arrays else None
        trained = ("02", args.runs / "02_ddpm") if key == "04" else (key, out)  # lesson 04 samples 02's model
        dataset = load_checkpoint(trained[1] / "checkpoint.pt", LESSON_NAMES[trained[0]])["config"]["dataset"]
        result = metrics.evaluate(arrays["images"], dataset, labels=labels)
        row.update(samples=result["samples"], fd=result["fd"], fd_real_floor=result["fd_real_floor"],
                   class_accuracy=result.get("class_accuracy", ""), class_entropy_bits=result["class_entropy_bits"])
        rows.append(row)
        print(row, flush=True)
        write(rows, args.results_tag)
        if key == "03" and args.guidance_samples:
            weights = [float(w) for w in args.guidance.split(",")]
            rows += guidance_sweep(out, weights, args.guidance_samples, seed=0)
            write(rows, args.results_tag)


if __name__ == "__main__":
    main()
