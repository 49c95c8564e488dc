"""Random flag combinations for every lesson: each must run a short smoke or be refused in one line (not a test file).

    python tests/fuzz_flags.py --runs 40 --seed 0     # about 2-4 minutes on a 2-core CPU

Each run draws, for one lesson, a value of the right type for some of its flags (edge values included), adds a
tiny dataset, one or two training steps and a small T, and calls the lesson's main() as its command line does
(utils.runtime.run); when that trains, the run is continued with --resume (same flags) and sampled with
--sample-only (flags drawn afresh: a different T or width must be refused in one line), and each lesson 02 or 04 checkpoint is
also run through examples/compare_methods.py with its own drawn flags. Acceptable: exit code 0, or exit code 1 or 2 with exactly one line on stderr. Anything
else (a traceback, an exception, several lines) is reported with the flags that caused it; the exit code is 1
if there was any.
"""
import argparse
import contextlib
import io
import os
import random
import re
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import load_lesson, write_mnist_like  # noqa: E402
from test_image_folder import write_folder  # noqa: E402
from utils import data  # noqa: E402
from utils.runtime import run  # noqa: E402

COMMON = {"--width": ["2", "4", "6", "8", "10", "12", "16", "24"], "--batch-size": ["1", "2", "16", "300"],
          "--num-samples": ["1", "3", "11"], "--seed": ["0", "7"], "--timesteps": ["2", "21", "25", "60"],
          "--sample-batch-size": ["1", "2", "64"], "--dataset": ["FOLDER", "FLAT"], "--image-size": ["8", "12", "16", "30"],
          "--channels": ["1", "3"]}
FLAGS = {
    "01_ddpm_toy.py": {**COMMON, "--width": ["8", "16", "24"], "--lr": ["1e-4", "2e-3"],
                       "--snr-gamma": ["0", "5", "1e6"]},
    "02_ddpm.py": {**COMMON, "--channel-mults": ["1,2", "1,2,4", "1,3", "2,2", "1,2,2,2"],
                   "--schedule": ["cosine", "linear"], "--prediction": ["eps", "v"], "--dropout": ["0", "0.3"],
                   "--num-res-blocks": ["1", "2"], "--variance": ["beta", "posterior"], "--no-clip-x0": [None],
                   "--ema-decay": ["0", "0.9"]},
    "03_conditional_ddpm.py": {**COMMON, "--channel-mults": ["1,2", "1,2,4", "1,3", "1,2,2,2"], "--guidance-weight": ["0", "3"],
                               "--guidance-scale": ["1", "7.5"],
                               "--class-label": ["0", "9"], "--p-uncond": ["0", "0.5", "1"],
                               "--dropout": ["0", "0.3"]},
    "04_ddim_fast_sampling.py": {**COMMON, "--channel-mults": ["1,2", "1,2,4", "1,3", "1,2,2,2"], "--steps": ["1", "2", "3", "25"],
                                 "--eta": ["0", "0.5", "1"], "--sampler": ["ddim", "dpm-solver++"],
                                 "--timestep-spacing": ["trailing", "leading", "linspace", "quadratic", "logsnr"],
                                 "--schedule": ["cosine", "linear"], "--prediction": ["eps", "v"],
                                 "--clip-x0": [None], "--no-clip-x0": [None], "--interpolate": [None]},
    "05_latent_diffusion.py": {**COMMON, "--width": ["4", "8", "12"], "--autoencoder-width": ["4", "8", "12"],
                               "--latent-channels": ["1", "4"], "--steps": ["1", "2", "5"], "--eta": ["0", "1"],
                               "--kl-weight": ["0", "1e-3"], "--interpolate": [None]},
}
# examples/compare_methods.py, fuzzed on each lesson 02 or 04 checkpoint that the runs above make.
COMPARE_FLAGS = {"--steps": ["1", "2,3", "25", "1,30", "3,3"], "--samplers": ["ddim", "dpm-solver++", "ddim,dpm-solver++"],
                 "--eta": ["0", "0,1", "0.5", "1.5"], "--timestep-spacing": ["trailing", "leading", "logsnr", "quadratic"],
                 "--clip-x0": [None], "--no-clip-x0": [None], "--num-samples": ["1", "3"], "--ddpm-samples": ["1", "2"],
                 "--batch-size": ["1", "2", "64"], "--seed": ["0", "5"]}


def draw(lesson, rng, max_timesteps=None):
    """A random subset of the lesson's flags, each with a random value of its list (--timesteps at most
    max_timesteps, when given)."""
    argv = []
    for flag, values in (COMPARE_FLAGS if lesson == "compare" else FLAGS[lesson]).items():
        if flag == "--timesteps" and max_timesteps:
            values = [value for value in values if int(value) <= max_timesteps]
        if rng.random() < 0.5:
            value = rng.choice(values)
            argv += [flag] if value is None else [flag, value]
    return argv


def smoke(module, argv):
    """main(argv) through run(): (exit code, stderr lines, traceback text or None)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run(lambda: module.main(argv))
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        except BaseException:  # noqa: BLE001 - the point is to catch whatever escapes
            return None, [], traceback.format_exc()
    lines = [line for line in err.getvalue().splitlines() if line.strip() and "\r" not in line and "it/s" not in line
             and "s/it" not in line and not re.search(r"\d%\|", line) and not line.startswith(("note:", "trained the"))]
    return code, lines, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-timesteps", type=int, default=None, help="draw --timesteps only up to this (faster)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    data.SYSTEM_COPIES = {}  # as in the tests: only the tiny dataset made here
    modules = {lesson: load_lesson(lesson) for lesson in FLAGS}
    modules["compare"] = load_lesson("examples/compare_methods.py")
    failures = outcomes = 0
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_mnist_like(folder / "data" / "MNIST" / "raw")
        write_mnist_like(folder / "data" / "MNIST" / "raw", count=64, split="test")  # the classifier's test split
        os.chdir(folder)  # compare_methods caches its classifier under ./outputs/metrics: keep it out of the repo
        write_folder(folder / "pictures")  # --dataset FOLDER: class subfolders of mixed pictures; FLAT: unlabelled
        write_folder(folder / "flat", classes=())
        for index in range(args.runs):
            lesson = list(FLAGS)[index % len(FLAGS)]
            flags = draw(lesson, rng, args.max_timesteps)
            places = {"FOLDER": str(folder / "pictures"), "FLAT": str(folder / "flat")}
            flags = [places.get(flag, flag) for flag in flags]
            argv = ["--data-dir", str(folder / "data"), "--out", str(folder / f"out{index}"), "--max-steps",
                    rng.choice(["1", "2"]), "--device", "cpu", *flags]
            if "--timesteps" not in flags:
                argv += ["--timesteps", "25"]  # T = 1000 would spend minutes sampling: not what is fuzzed
            runs = [("train", argv)]
            code, lines, crash = smoke(modules[lesson], argv)
            if code == 0:  # then continue it, and sample from it, with flags drawn afresh
                out = ["--data-dir", str(folder / "data"), "--out", str(folder / f"out{index}"), "--device", "cpu"]
                runs += [("resume", [*out, "--resume", "--max-steps", "3", *flags]),
                         ("sample-only", [*out, "--sample-only",
                                          *[places.get(flag, flag) for flag in draw(lesson, rng, args.max_timesteps)]])]
                if lesson in ("02_ddpm.py", "04_ddim_fast_sampling.py"):  # scoring trains a classifier: rarely
                    metrics = [] if rng.random() < 0.2 else ["--no-metrics"]
                    runs += [("compare", ["--data-dir", str(folder / "data"), "--out", str(folder / f"compare{index}"),
                                          "--device", "cpu", "--checkpoint", str(folder / f"out{index}" / "checkpoint.pt"),
                                          *metrics, *draw("compare", rng)])]
            for kind, run_argv in runs:
                if kind != "train":
                    code, lines, crash = smoke(modules["compare" if kind == "compare" else lesson], run_argv)
                ok = crash is None and (code == 0 or (code in (1, 2) and len(lines) == 1))
                outcomes += 1
                status = "ok" if code == 0 else f"refused ({code}): {lines[0] if lines else ''}"
                if not ok:
                    failures += 1
                    status = "FAILED: " + (crash.strip().splitlines()[-1] if crash else f"exit {code}, {lines}")
                print(f"{lesson} {kind} {' '.join(run_argv[6:])}\n    {status}",
                      flush=True)
    print(f"{outcomes} runs, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
