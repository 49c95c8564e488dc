"""Random flag combinations for every lesson: each must act or be refused in one line, and a refused run must
leave nothing behind (not a test file; tests/test_reliability.py runs a fast slice of it).

    python tests/fuzz_flags.py --runs 40 --seed 0     # about 4-8 minutes on a 2-core CPU

Each run draws, for one lesson, values for some of its flags (for a flag several entry points share, the values
of all of them, so that each draws the values any of them refuses), adds a tiny dataset, three or four training
steps and a small T, and calls the lesson's main() as its command line does (utils.runtime.run); when that trains,
the run is continued with --resume (same flags) and sampled with --sample-only (flags drawn afresh: a different T
or width must be refused in one line); each lesson 02, 03 or 04 checkpoint is also edited by
examples/edit_images.py, and each lesson 02 or 04 checkpoint compared by examples/compare_methods.py, with their own
drawn flags. Three checks, each counted:
  - one line: exit code 0, or exit code 1 or 2 with exactly one line on stderr (no traceback, no exception);
  - no trace: a refused run (exit 1 or 2) leaves its --out folder as it found it (absent, or every file the same);
  - no ignored flag: for each run that exits 0, up to --ablations of its drawn flags (those whose value differs
    from what the run would use without them) are left out in a second run into a fresh folder; a flag is
    silently ignored when that run writes the same files with the same contents (weights, arrays, pictures).
Anything else is reported with the flags that caused it; the exit code is 1 if there was any.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import os
import random
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

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


# examples/edit_images.py, fuzzed on each lesson 02, 03 or 04 checkpoint: the edit, then flags drawn for it
# (PICTURE: a picture of the --dataset FOLDER; BROKEN: its corrupt .png).
EDITS = {"sdedit": ("--strength",), "inpaint": ("--mask", "--resample"), "translate": ("--strength", "--guidance-weight")}
EDIT_FLAGS = {"--steps": ["1", "5", "25", "40"], "--eta": ["0", "0.5", "1", "1.5"], "--count": ["1", "2"],
              "--seed": ["0", "3"], "--test-index": ["0", "5", "100000", "-1"], "--input": ["PICTURE", "BROKEN"],
              "--strength": ["0.5", "0.2,1", "0", "1.5"], "--mask": ["box", "left", "strokes"],
              "--resample": ["1", "2"], "--guidance-weight": ["0", "2"]}
# Flags shared by several entry points draw the values of all of them (issue 38: each entry point must meet the values
# any other refuses): widths that are odd or no multiple of 4 or 8, a batch larger than the data, T = 1 and T = 20.
SHARED = {}
for _flags in FLAGS.values():
    for _flag, _values in _flags.items():
        SHARED.setdefault(_flag, [])
        SHARED[_flag] += [value for value in _values if value not in SHARED[_flag]]
SHARED["--width"] += [value for value in ("7", "32") if value not in SHARED["--width"]]
SHARED["--timesteps"] += ["1", "20"]
SHARED_SHARE = 0.25  # how often a shared flag draws from the union (else its own list, to reach training often)
# Flags whose value may leave every output the same although they act: their reason.
NO_VISIBLE_EFFECT = {  # flag: (the entry point it concerns, None for all; why)
    "--sample-batch-size": (None, "the samples are the same whatever the batching (utils.runtime.in_batches)"),
    "--ema-decay": (None, "the EMA warm-up keeps the decay below every drawn value for the first steps"),
    "--batch-size": ("compare", "compare_methods' batching does not change its samples (a lesson's trains)"),
}


def visible(flag, module_key):
    """Whether leaving `flag` out of a run of `module_key` should change what it writes (NO_VISIBLE_EFFECT)."""
    return flag not in NO_VISIBLE_EFFECT or NO_VISIBLE_EFFECT[flag][0] not in (None, module_key)


def draw(lesson, rng, max_timesteps=None):
    """A random subset of the lesson's flags, each with a random value of its list, or now and then (SHARED_SHARE)
    for a shared flag of the union of all the lessons' lists (--timesteps at most max_timesteps, when given)."""
    argv, flags = [], COMPARE_FLAGS if lesson == "compare" else FLAGS.get(lesson)
    if lesson in EDITS:  # an edit of examples/edit_images.py: its own flags and the common ones
        flags = {flag: values for flag, values in EDIT_FLAGS.items()
                 if flag in EDITS[lesson] or not any(flag in own for own in EDITS.values())}
    for flag, values in flags.items():
        if lesson in FLAGS and rng.random() < SHARED_SHARE:  # now and then another entry point's values
            values = SHARED.get(flag, values)
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


def snapshot(folder):
    """Every file under `folder` -> the SHA-1 of its bytes; None when the folder does not exist."""
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): hashlib.sha1(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _tensors(value, name=""):
    """The tensors inside a checkpoint's nested dicts and lists, by name, as bytes."""
    if isinstance(value, torch.Tensor):
        return {name: value.cpu().numpy().tobytes()}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    found = {}
    for key, item in items:
        found.update(_tensors(item, f"{name}/{key}"))
    return found


TIMING = re.compile(r"second|speed|per_s|time", re.IGNORECASE)  # CSV columns that differ from run to run


def written(folder, before):
    """What a run wrote into `folder` (files new or changed since `before`, a snapshot), each as what a flag could
    change: a checkpoint's tensors, an .npz file's arrays, a picture's bytes, a CSV file's columns but its timings;
    other text (Markdown tables with timings in their cells) and the loss plot by name only."""
    after = snapshot(folder) or {}
    made = {}
    for name, digest in after.items():
        if before and before.get(name) == digest:
            continue
        path = folder / name
        if path.suffix == ".pt":
            made[name] = _tensors(torch.load(path, map_location="cpu", weights_only=True))
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                made[name] = {key: arrays[key].tobytes() for key in arrays.files}
        elif path.suffix in (".png", ".gif") and path.name != "loss.png":
            made[name] = digest
        elif path.suffix == ".csv":  # its columns but the timings (losses, step counts, scores, image counts)
            with open(path, newline="") as file:
                made[name] = [{key: value for key, value in row.items() if not TIMING.search(key or "")}
                              for row in csv.DictReader(file)]
        else:
            made[name] = None
    return made


def without(argv, flag):
    """argv with `flag` (and its value, if it has one) left out."""
    index = argv.index(flag)
    takes_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
    return argv[:index] + argv[index + 1 + takes_value:]


# What a checkpoint fixes: given when a checkpoint is read, these are checks (another value is refused), not choices.
CHECKED = {"dataset", "image_size", "channels", "width", "channel_mults", "timesteps", "schedule", "prediction",
           "weighting_scheme", "num_res_blocks", "dropout", "latent_channels", "autoencoder_width", "kl_weight"}


def resolved(module, parsed, checkpoint_config):
    """Parsed arguments with the defaults a run settles later (None: "the sampler's own") settled as lesson 04's
    spacing_for and clip_for settle them, so that --timestep-spacing trailing for DDIM counts as its default."""
    if parsed is None:
        return None
    lesson04 = getattr(module, "lesson04", module)
    samplers = parsed.get("samplers") or (parsed.get("sampler"),)
    if "timestep_spacing" in parsed and hasattr(lesson04, "spacing_for"):
        prediction = (checkpoint_config or {}).get("prediction") or parsed.get("prediction", "eps")
        parsed["timestep_spacing"] = tuple(lesson04.spacing_for(sampler, parsed["timestep_spacing"], prediction)
                                           for sampler in samplers if sampler in lesson04.DEFAULT_SPACING)
    if parsed.get("steps", 0) is None and hasattr(module, "DEFAULT_STEPS"):  # lessons 04 and 05: min(default, T)
        timesteps = (checkpoint_config or {}).get("timesteps") or parsed.get("timesteps") or getattr(module, "T", 1000)
        parsed["steps"] = min(module.DEFAULT_STEPS, timesteps)
    if parsed.get("channels", 0) is None and parsed.get("image_folder"):
        parsed["channels"] = 3  # both folders written here hold colour pictures: a folder's own channels are 3
    if "clip_x0" in parsed and hasattr(lesson04, "clip_for"):
        prediction = (checkpoint_config or {}).get("prediction") or parsed.get("prediction", "eps")
        parsed["clip_x0"] = lesson04.clip_for(prediction, parsed["clip_x0"])
    return parsed


def acts(module, argv, flag, checkpoint_config):
    """Whether leaving `flag` out of argv changes what the run is asked to do: its parsed arguments differ (with
    the defaults a run settles later settled), and, when a checkpoint is read, it is not one of the flags CHECKED
    against the checkpoint (an accepted --width is the checkpoint's own: a check, not a choice)."""
    def parsed(arguments):
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                return {key: value for key, value in vars(module.parse_args(arguments)).items() if key != "given"}
            except SystemExit:
                return None
    chosen, default = resolved(module, parsed(argv), checkpoint_config), resolved(module, parsed(without(argv, flag)),
                                                                                   checkpoint_config)
    if chosen is None or default is None or chosen == default:
        return False
    dest = flag.lstrip("-").replace("-", "_")
    if dest not in chosen and dest.startswith("no_"):  # --no-X of a BooleanOptionalAction sets X
        dest = dest[3:]
    steps = chosen.get("steps")
    if dest == "clip_x0" and steps is not None and set(steps if isinstance(steps, tuple) else (steps,)) == {1}:
        return False  # one step lands on x0_pred itself, which the sample's final clamp clips either way
    return checkpoint_config is None or dest not in CHECKED  # with a checkpoint: accepted, so the same as its own


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="training runs drawn (each may add a resume, a "
                        "sample-only and a compare_methods run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-timesteps", type=int, default=None, help="draw --timesteps only up to this (faster)")
    parser.add_argument("--ablations", type=int, default=1,
                        help="drawn flags left out, one at a time, of each run that exits 0 (0: none)")
    parser.add_argument("--lessons", default=None, help="comma-separated lesson files to draw from (default: all)")
    parser.add_argument("--quiet", action="store_true", help="print only the failures and the counts")
    return parser.parse_args(argv)


def fuzz(args):
    """The fuzz of this file's docstring: (counts {"runs", "refused", "tracebacks", "traces", "ablations",
    "ignored"}, failures [one line each])."""
    rng = random.Random(args.seed)
    data.SYSTEM_COPIES = {}  # as in the tests: only the tiny dataset made here
    lessons = args.lessons.split(",") if args.lessons else list(FLAGS)
    modules = {lesson: load_lesson(lesson) for lesson in lessons}
    modules["compare"] = load_lesson("examples/compare_methods.py")
    modules["edit"] = load_lesson("examples/edit_images.py")
    counts = {"runs": 0, "refused": 0, "tracebacks": 0, "traces": 0, "ablations": 0, "ignored": 0}
    failures = []
    start = Path.cwd()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_mnist_like(folder / "data" / "MNIST" / "raw")
        write_mnist_like(folder / "data" / "MNIST" / "raw", count=64, split="test")  # the classifier's test split
        try:
            os.chdir(folder)  # compare_methods caches its classifier under ./outputs/metrics: keep it out of the repo
            write_folder(folder / "pictures")  # --dataset FOLDER: class subfolders of mixed pictures; FLAT: unlabelled
            write_folder(folder / "flat", classes=())
            places = {"FOLDER": str(folder / "pictures"), "FLAT": str(folder / "flat"),
                      "PICTURE": str(folder / "pictures" / "dogs" / "1.png"),
                      "BROKEN": str(folder / "pictures" / "cats" / "broken.png")}

            def attempt(module_key, run_argv, out, kind, label, drawn, checkpoint_config=None):
                """Run once and check it: one line, no trace if refused, and (for `drawn` flags) none ignored."""
                before, began = snapshot(out), time.perf_counter()
                code, lines, crash = smoke(modules[module_key], run_argv)
                seconds = time.perf_counter() - began
                counts["runs"] += 1
                status = "ok" if code == 0 else f"refused ({code}): {lines[0] if lines else ''}"
                problems = []
                if crash is not None or not (code == 0 or (code in (1, 2) and len(lines) == 1)):
                    counts["tracebacks"] += 1
                    problems.append(crash.strip().splitlines()[-1] if crash else f"exit {code}, {lines}")
                elif code != 0:
                    counts["refused"] += 1
                    if snapshot(out) != before:
                        counts["traces"] += 1
                        problems.append(f"the refused run changed {out.name}: {before} -> {snapshot(out)}")
                made = written(out, before) if code == 0 else None
                if code == 0 and args.ablations:
                    candidates = [flag for flag in drawn if flag.startswith("--") and visible(flag, module_key)
                                  and acts(modules[module_key], run_argv, flag, checkpoint_config)]
                    for flag in rng.sample(candidates, min(args.ablations, len(candidates))):
                        twin = folder / f"ablation{counts['ablations']}"
                        counts["ablations"] += 1
                        twin_argv = [str(twin) if value == str(out) else value for value in without(run_argv, flag)]
                        twin_code, _, twin_crash = smoke(modules[module_key], twin_argv)
                        if twin_crash is None and twin_code == 0 and written(twin, None) == made:
                            counts["ignored"] += 1
                            problems.append(f"{flag} was silently ignored: the run without it wrote the same files")
                if not args.quiet or problems:
                    print(f"{label} {kind} {' '.join(run_argv[6:])}\n    {status} ({seconds:.1f} s)", flush=True)
                for problem in problems:
                    print(f"    FAILED: {problem}", flush=True)
                    failures.append(f"{label} {kind} {' '.join(run_argv)}: {problem}")
                return code

            for index in range(args.runs):
                lesson = lessons[index % len(lessons)]
                flags = [places.get(flag, flag) for flag in draw(lesson, rng, args.max_timesteps)]
                out = folder / f"out{index}"
                argv = ["--data-dir", str(folder / "data"), "--out", str(out), "--max-steps",
                        rng.choice(["3", "4"]), "--device", "cpu", *flags]
                if "--timesteps" not in flags:
                    argv += ["--timesteps", "25"]  # T = 1000 would spend minutes sampling: not what is fuzzed
                if "--num-samples" not in flags:
                    argv += ["--num-samples", "2"]  # nor would 64 samples (their count is drawn above)
                if lesson in ("02_ddpm.py", "03_conditional_ddpm.py"):
                    argv += ["--warmup-steps", "0"]  # the full learning rate from step 1: after a warm-up step of
                    # 1/200 of it the weights hardly move, and a flag's effect would not reach an 8-bit picture
                if attempt(lesson, argv, out, "train", lesson, flags) != 0:
                    continue
                # then continue it, and sample from it, with flags drawn afresh
                config = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True).get("config", {})
                base = ["--data-dir", str(folder / "data"), "--out", str(out), "--device", "cpu"]
                attempt(lesson, [*base, "--resume", "--max-steps", "5", *flags], out, "resume", lesson, [])
                drawn = [places.get(flag, flag) for flag in draw(lesson, rng, args.max_timesteps)]
                sampled = [*base, "--sample-only", "--checkpoint", str(out / "checkpoint.pt"), *drawn]
                sample_out = folder / f"sampled{index}"
                sampled[3] = str(sample_out)  # into a folder of its own, so that what it wrote is what it made
                attempt(lesson, sampled, sample_out, "sample-only", lesson, drawn, config)
                if lesson in ("02_ddpm.py", "03_conditional_ddpm.py", "04_ddim_fast_sampling.py"):
                    edit = rng.choice(list(EDITS) if lesson == "03_conditional_ddpm.py" else ["sdedit", "inpaint"])
                    drawn = [places.get(flag, flag) for flag in draw(edit, rng)]
                    if edit == "translate":
                        drawn += ["--class-label", rng.choice(["0", "1", "12"])]
                    edit_out = folder / f"edit{index}"
                    attempt("edit", [edit, "--data-dir", str(folder / "data"), "--out", str(edit_out), "--device",
                                     "cpu", "--checkpoint", str(out / "checkpoint.pt"), *drawn],
                            edit_out, "edit", lesson, drawn, config)
                if lesson in ("02_ddpm.py", "04_ddim_fast_sampling.py"):  # scoring trains a classifier: rarely
                    metrics = [] if rng.random() < 0.2 else ["--no-metrics"]
                    drawn = draw("compare", rng)
                    small = []  # the default 1000 and 256 samples would take minutes: not what is fuzzed
                    for flag, value in (("--num-samples", "2"), ("--ddpm-samples", "1")):
                        if flag not in drawn:
                            small += [flag, value]
                    compare_out = folder / f"compare{index}"
                    attempt("compare", ["--data-dir", str(folder / "data"), "--out", str(compare_out), "--device", "cpu",
                                        "--checkpoint", str(out / "checkpoint.pt"), *metrics, *drawn, *small],
                            compare_out, "compare", lesson, drawn, config)
        finally:
            os.chdir(start)
    return counts, failures


def main(argv=None):
    counts, failures = fuzz(parse_args(argv))
    print(", ".join(f"{count} {name}" for name, count in counts.items()))
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
