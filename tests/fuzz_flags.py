"""Random flag combinations for every lesson: each must act or be refused in one line, and a refused run must
leave nothing behind (not a test file; tests/test_reliability.py runs a fast slice of it).

    python tests/fuzz_flags.py --runs 30 --seed 31 --max-timesteps 25   # about 15 minutes on a 2-core CPU

Each run draws, for one lesson, values for some of its flags (FLAGS_PER_RUN on average; now and then, for one flag
several entry points share, from the values of all of them, so that each meets the values any of them refuses),
adds a tiny dataset, three or four training steps (or the drawn --epochs) and a small T, and calls the lesson's
main() as its command line does (utils.runtime.run). When that trains, the run is sometimes started afresh in the
same folder with --lr 1e30 (it fails at step 1 and must leave the good run as it was), then continued with --resume
(same flags) and sampled with --sample-only (flags drawn afresh: a different T or width must be refused in one
line). Each lesson 02, 03 or 04 checkpoint is also edited by examples/edit_images.py, each lesson 02 or 04
checkpoint compared by examples/compare_methods.py, and each lesson 05 autoencoder used by examples/text_to_image.py
(trained, resumed, sampled), with their own drawn flags; now and then a figure of python -m utils.visualize is drawn
from the run's files, its samples scored by python -m utils.metrics, and GETTING_STARTED.py run. Every flag of
every entry point is drawn, or named in NOT_DRAWN with the reason (tests/test_reliability.py checks this).
Three checks, each counted:
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
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import load_lesson, write_mnist_like  # noqa: E402
from test_image_folder import write_folder  # noqa: E402
from test_text_to_image import write_fashion_like  # noqa: E402
from utils import data, metrics, visualize  # noqa: E402
from utils.runtime import run  # noqa: E402

COMMON = {"--width": ["2", "4", "6", "8", "10", "12", "16", "24"], "--batch-size": ["1", "2", "16", "300"],
          "--num-samples": ["1", "3", "11"], "--seed": ["0", "7"], "--timesteps": ["2", "21", "25", "60"],
          "--sample-batch-size": ["1", "2", "64"], "--dataset": ["FOLDER", "FLAT", "fashion-mnist"],
          "--image-size": ["8", "12", "16", "30"], "--channels": ["1", "3"], "--epochs": ["1", "0"],
          "--lr": ["1e-3", "1e30", "-1"]}
TRAINING = {"--warmup-steps": ["0", "2"], "--ema-decay": ["0", "0.9", "1"], "--checkpoint-every": ["1", "2", "0"]}
FLAGS = {
    "01_ddpm_toy.py": {**COMMON, "--width": ["8", "16", "24"], "--snr-gamma": ["0", "5", "1e6"]},
    "02_ddpm.py": {**COMMON, **TRAINING, "--channel-mults": ["1,2", "1,2,4", "1,3", "2,2", "1,2,2,2"],
                   "--schedule": ["cosine", "linear"], "--prediction": ["eps", "v", "flow"],
                   "--weighting-scheme": ["logit_normal", "none"], "--dropout": ["0", "0.3"],
                   "--num-res-blocks": ["1", "2"], "--variance": ["beta", "posterior"], "--clip-x0": [None],
                   "--no-clip-x0": [None], "--weight-decay": ["0", "0.5", "-1"], "--grad-clip": ["0", "0.01"],
                   "--precision": ["auto", "fp32", "bf16", "fp16"]},
    "03_conditional_ddpm.py": {**COMMON, **TRAINING, "--channel-mults": ["1,2", "1,2,4", "1,3", "1,2,2,2"],
                               "--guidance-weight": ["0", "3"], "--guidance-scale": ["1", "7.5"],
                               "--class-label": ["0", "9"], "--p-uncond": ["0", "0.5", "1"],
                               "--dropout": ["0", "0.3"], "--num-res-blocks": ["1", "2"]},
    "04_ddim_fast_sampling.py": {**COMMON, "--channel-mults": ["1,2", "1,2,4", "1,3", "1,2,2,2"],
                                 "--steps": ["1", "2", "3", "25"], "--eta": ["0", "0.5", "1"],
                                 "--sampler": ["ddim", "dpm-solver++", "euler", "heun"],
                                 "--timestep-spacing": ["trailing", "leading", "linspace", "quadratic", "logsnr",
                                                        "flow_time"],
                                 "--schedule": ["cosine", "linear"], "--prediction": ["eps", "v", "flow"],
                                 "--clip-x0": [None], "--no-clip-x0": [None], "--interpolate": [None]},
    "05_latent_diffusion.py": {**COMMON, "--width": ["4", "8", "12"], "--autoencoder-width": ["4", "8", "12"],
                               "--latent-channels": ["1", "4"], "--steps": ["1", "2", "5"], "--eta": ["0", "1"],
                               "--kl-weight": ["0", "1e-3"], "--interpolate": [None],
                               "--stage": ["autoencoder", "diffusion", "all"], "--autoencoder-epochs": ["1", "0"],
                               "--autoencoder-lr": ["1e-3", "0"], "--ema-decay": ["0", "0.9"],
                               "--timestep-spacing": ["trailing", "leading", "linspace"]},
}
# examples/compare_methods.py, fuzzed on each lesson 02 or 04 checkpoint that the runs above make.
COMPARE_FLAGS = {"--steps": ["1", "2,3", "25", "1,30", "3,3"],
                 "--samplers": ["ddim", "dpm-solver++", "ddim,dpm-solver++", "heun", "euler,heun"],
                 "--eta": ["0", "0,1", "0.5", "1.5"],
                 "--timestep-spacing": ["trailing", "leading", "linspace", "logsnr", "quadratic", "flow_time"],
                 "--clip-x0": [None], "--no-clip-x0": [None], "--num-samples": ["1", "3"], "--ddpm-samples": ["1", "2"],
                 "--batch-size": ["1", "2", "64"], "--seed": ["0", "5"]}


# examples/edit_images.py, fuzzed on each lesson 02, 03 or 04 checkpoint: the edit, then flags drawn for it
# (PICTURE: a picture of the --dataset FOLDER; BROKEN: its corrupt .png; MASK: a 28 x 28 mask, white on the right).
EDITS = {"sdedit": ("--strength", "--measure"), "inpaint": ("--mask", "--mask-image", "--resample"),
         "translate": ("--strength", "--guidance-weight", "--class-label", "--measure")}
EDIT_FLAGS = {"--steps": ["1", "5", "25", "40"], "--eta": ["0", "0.5", "1", "1.5"], "--count": ["1", "2"],
              "--seed": ["0", "3"], "--test-index": ["0", "5", "100000", "-1"], "--input": ["PICTURE", "BROKEN"],
              "--strength": ["0.5", "0.2,1", "0", "1.5"], "--mask": ["box", "left", "strokes"],
              "--resample": ["1", "2"], "--guidance-weight": ["0", "2"], "--class-label": ["0", "1", "12"],
              "--measure": ["2", "100000"], "--mask-image": ["MASK", "PICTURE", "BROKEN"]}
# examples/text_to_image.py, trained and sampled on the autoencoder of each lesson 05 run on fashion-mnist.
# (--epochs only as 0, refused: one pass is 60000 canvases whatever the data, minutes even here)
TEXT_FLAGS = {"--epochs": ["0"], "--batch-size": ["1", "8", "600"], "--lr": ["1e-3", "1e30", "-1"],
              "--width": ["7", "8", "16"], "--ema-decay": ["0", "0.9", "1"],
              "--prompt": ["a shirt on the left", "a bag on the left and a boot on the right", "", "a hat on the left"],
              "--guidance-scale": ["0", "1", "4"], "--steps": ["1", "3", "30"], "--eta": ["0", "1", "1.5"],
              "--num-samples": ["1", "3", "0"], "--seed": ["0", "4"]}
# python -m utils.visualize: each figure and its flags (RUN_CSV, RUN_NPZ: the metrics.csv and samples.npz of a run
# made above; PICTURE: a picture, given where a file of another kind is asked for).
FIGURES = {"forward": ("--dataset", "--schedule", "--count", "--seed"),
           "reverse": ("--dataset", "--schedule", "--count", "--seed", "--reference"),
           "schedules": (), "loss": (), "samples": ("--labels", "--count", "--stride")}
VISUALIZE_FLAGS = {"--dataset": ["mnist", "fashion-mnist", "cifar10"], "--schedule": ["linear", "cosine"],
                   "--count": ["1", "3", "40"], "--seed": ["0", "2"], "--reference": ["3", "20", "100000"],
                   "--labels": ["a", "a b"], "--stride": ["1", "2", "1000"]}
# python -m utils.metrics on a run's samples.npz.
METRICS_FLAGS = {"--dataset": ["mnist", "fashion-mnist", "cifar10"], "--limit": ["1", "2", "100000", "0"]}
# GETTING_STARTED.py (always --offline: this machine may have no network, and the probe would wait for it).
GETTING_STARTED_FLAGS = {"--device": ["auto", "cpu", "cuda", "mps"], "--data-dir": ["DATA", "NOWHERE", "PICTURE"],
                         "--out": ["NEW", "PICTURE"], "--seconds": ["0.2", "0", "-1"]}
# Flags shared by several entry points draw the values of all of them (issue 38: each entry point must meet the values
# any other refuses): widths that are odd or no multiple of 4 or 8, a batch larger than the data, T = 1 and T = 20.
SHARED = {}
for _flags in FLAGS.values():
    for _flag, _values in _flags.items():
        SHARED.setdefault(_flag, [])
        SHARED[_flag] += [value for value in _values if value not in SHARED[_flag]]
SHARED["--width"] += [value for value in ("7", "32") if value not in SHARED["--width"]]
SHARED["--timesteps"] += ["1", "20"]
# Flags that apply only beside a value of another flag (anywhere else they are refused in one line).
DEPENDS = {"--image-size": ("--dataset", ("FOLDER", "FLAT")), "--channels": ("--dataset", ("FOLDER", "FLAT")),
           "--weighting-scheme": ("--prediction", ("flow",))}
# Values drawn to be refused (or to meet a limit): a run draws at most one of them, or one shared flag from the
# union of every entry point's values; EDGE_SHARE of the runs do, the others draw only values that may all act.
BAD = {"--epochs": {"0"}, "--lr": {"1e30", "-1"}, "--ema-decay": {"1"}, "--checkpoint-every": {"0"},
       "--weight-decay": {"-1"}, "--batch-size": {"300", "600"}, "--width": {"2", "7"}, "--num-samples": {"0", "11"},
       "--steps": {"25", "30", "40", "1,30"}, "--eta": {"1.5", "0,1"}, "--prompt": {"a hat on the left"},
       "--precision": {"bf16", "fp16"}, "--autoencoder-epochs": {"0"}, "--autoencoder-lr": {"0"},
       "--test-index": {"100000", "-1"}, "--strength": {"0", "1.5"}, "--seconds": {"0", "-1"},
       "--limit": {"0", "100000"}, "--reference": {"100000"}, "--stride": {"1000"}, "--measure": {"100000"},
       "--class-label": {"12"}, "--mask-image": {"PICTURE", "BROKEN"}, "--input": {"BROKEN"}, "--timesteps": {"2"},
       "--image-size": {"30"}, "--channel-mults": {"1,2,2,2"}, "--dataset": {"cifar10"}, "--count": {"40"},
       "--device": {"cuda", "mps"}, "--data-dir": {"NOWHERE", "PICTURE"}, "--out": {"PICTURE"},
       "--guidance-scale": {"0"}}
EDGE_SHARE = 0.5
FLAGS_PER_RUN = 5  # flags drawn per run on average: with more, nearly every run draws some value that is refused
# Flags whose value may leave every output the same although they act: their reason. (A flag that a run names in a
# "note:" line, as the lessons do for an --ema-decay that a short run never reaches, is not silently ignored.)
NO_VISIBLE_EFFECT = {  # flag: (the entry point it concerns, None for all; why)
    "--sample-batch-size": (None, "the samples are the same whatever the batching (utils.runtime.in_batches)"),
    "--batch-size": ("compare", "compare_methods' batching does not change its samples (a lesson's trains)"),
    "--checkpoint-every": (None, "it says when checkpoints are saved during a run; the last one is the same"),
    "--seconds": ("getting_started", "it says how long the toy model is timed: only the report's figures change"),
}
# The flags each entry point has that are not drawn, and why (test_reliability checks that every other flag is drawn).
NOT_DRAWN = {"--help": "prints the help", "--out": "set by the fuzz: a fresh folder per run",
             "--data-dir": "set by the fuzz: the tiny data it writes", "--device": "set by the fuzz: cpu",
             "--max-steps": "set by the fuzz (3 or 4), unless --epochs or --autoencoder-epochs is drawn (exclusive)",
             "--resume": "a run of its own after each training run", "--sample-only": "a run of its own",
             "--checkpoint": "set by the fuzz: the checkpoint of the run before",
             "--autoencoder": "set by the fuzz: the autoencoder of a lesson 05 run",
             "--no-metrics": "set by the fuzz: compare_methods scores 1 run in 5 (scoring trains a classifier)",
             "--offline": "set by the fuzz: GETTING_STARTED never probes the network here",
             "--cache-dir": "set by the fuzz: the classifier's cache in its own folder"}


def visible(flag, module_key):
    """Whether leaving `flag` out of a run of `module_key` should change what it writes (NO_VISIBLE_EFFECT)."""
    return flag not in NO_VISIBLE_EFFECT or NO_VISIBLE_EFFECT[flag][0] not in (None, module_key)


def flags_of(entry):
    """The flags drawn for `entry`: a lesson file, "compare", an edit of edit_images ("sdedit", ...), "text",
    a figure of utils.visualize ("figure:loss", ...), "metrics" or "getting_started": {flag: [values]}."""
    if entry in FLAGS:
        return FLAGS[entry]
    if entry in EDITS:  # an edit of examples/edit_images.py: its own flags and the common ones
        return {flag: values for flag, values in EDIT_FLAGS.items()
                if flag in EDITS[entry] or not any(flag in own for own in EDITS.values())}
    if entry.startswith("figure:"):
        return {flag: VISUALIZE_FLAGS[flag] for flag in FIGURES[entry.split(":")[1]]}
    return {"compare": COMPARE_FLAGS, "text": TEXT_FLAGS, "metrics": METRICS_FLAGS,
            "getting_started": GETTING_STARTED_FLAGS}[entry]


def draw(entry, rng, max_timesteps=None):
    """A random subset of the entry point's flags (FLAGS_PER_RUN on average), each with a random value of its list
    but the BAD ones; in EDGE_SHARE of the runs one flag is drawn at the edge instead: a BAD value of its own, or
    (a shared flag of a lesson) any value of any lesson's list (--timesteps at most max_timesteps, when given)."""
    argv, flags = [], flags_of(entry)
    edges = [flag for flag in flags if BAD.get(flag, set()) & set(flags[flag]) or (entry in FLAGS and flag in SHARED)]
    edge = rng.choice(edges) if edges and rng.random() < EDGE_SHARE else None
    for flag, values in flags.items():
        if flag == edge:  # another entry point's values (those its own list lacks), or its own BAD ones
            own_good = [value for value in values if value not in BAD.get(flag, ())]
            others = [value for value in SHARED.get(flag, ()) if value not in own_good] if entry in FLAGS else []
            bad = [value for value in values if value in BAD.get(flag, ())]
            values = (others if others and (not bad or rng.random() < 0.5) else bad) or values
        else:
            values = [value for value in values if value not in BAD.get(flag, ())]
        if flag == "--timesteps" and max_timesteps:
            values = [value for value in values if int(value) <= max_timesteps]
        if values and (rng.random() < min(0.5, FLAGS_PER_RUN / len(flags)) or flag == edge):
            value = rng.choice(values)
            argv += [flag] if value is None else [flag, value]
    for flag, (other, values) in DEPENDS.items():  # mostly only where it applies (its refusal is drawn 1 in 5)
        if flag in argv and not (other in argv and argv[argv.index(other) + 1] in values) and rng.random() < 0.8:
            argv = without(argv, flag)
    return argv


def smoke(module, argv):
    """main(argv) through run(): (exit code, stderr lines but notes and progress, traceback text or None, the flags
    that a "note:" line names, stdout). A main that returns a number (GETTING_STARTED) exits with it."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            returned = []
            run(lambda: returned.append(module.main(argv)))
            code = returned[0] if returned and isinstance(returned[0], int) else 0
        except SystemExit as exit_info:
            code = exit_info.code
        except BaseException:  # noqa: BLE001 - the point is to catch whatever escapes
            return None, [], traceback.format_exc(), set(), out.getvalue()
    notes = [line for line in (err.getvalue() + out.getvalue()).splitlines() if line.startswith("note:")]
    lines = [line for line in err.getvalue().splitlines() if line.strip() and "\r" not in line and "it/s" not in line
             and "s/it" not in line and not re.search(r"\d%\|", line) and not line.startswith(("note:", "trained the"))]
    return code, lines, None, set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(notes))), out.getvalue()


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


def unless_drawn(drawn, *defaults):
    """The (flag, value) pairs of `defaults` whose flag is not among `drawn`, as argv: the fuzz's small settings."""
    return [part for flag, value in defaults if flag not in drawn for part in (flag, value)]


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
    if parsed.get("device") == "auto":  # this machine's choice, as the fuzz runs everything on the CPU
        parsed["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if parsed.get("precision") == "auto" and not torch.cuda.is_available():  # lesson 02: fp32 off CUDA
        parsed["precision"] = "fp32"
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


def _spacings(parsed):
    spacing = parsed.get("timestep_spacing")
    return spacing if isinstance(spacing, tuple) else (spacing,)


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
    timesteps = (checkpoint_config or {}).get("timesteps") or chosen.get("timesteps")
    uniform = {"trailing", "leading", "linspace"}
    if dest == "timestep_spacing" and steps is not None and set(steps if isinstance(steps, tuple) else (steps,)) \
            == {timesteps} and {*_spacings(chosen), *_spacings(default)} <= uniform:
        return False  # with as many steps as T, each of these spacings visits every timestep: the same sampler
    return checkpoint_config is None or dest not in CHECKED  # with a checkpoint: accepted, so the same as its own


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="training runs drawn (each may add a resume, a "
                        "sample-only and a compare_methods run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-timesteps", type=int, default=None, help="draw --timesteps only up to this (faster)")
    parser.add_argument("--timesteps", type=int, default=25, help="T of a run that draws none (smaller: faster)")
    parser.add_argument("--ablations", type=int, default=1,
                        help="drawn flags left out, one at a time, of each run that exits 0 (0: none)")
    parser.add_argument("--lessons", default=None, help="comma-separated lesson files to draw from (default: all)")
    parser.add_argument("--quiet", action="store_true", help="print only the failures and the counts")
    return parser.parse_args(argv)


def fuzz(args):
    """The fuzz of this file's docstring: (counts {"runs", "refused", "tracebacks", "traces", "ablations",
    "ignored"}, failures [one line each], accepted {flag: runs that drew it and exited 0, per entry point})."""
    rng = random.Random(args.seed)
    data.SYSTEM_COPIES = {}  # as in the tests: only the tiny dataset made here
    lessons = args.lessons.split(",") if args.lessons else list(FLAGS)
    modules = {lesson: load_lesson(lesson) for lesson in lessons}
    modules["compare"] = load_lesson("examples/compare_methods.py")
    modules["edit"] = load_lesson("examples/edit_images.py")
    modules["text"] = load_lesson("examples/text_to_image.py")
    modules["getting_started"] = load_lesson("GETTING_STARTED.py")
    modules["visualize"], modules["metrics"] = visualize, metrics
    counts = {"runs": 0, "refused": 0, "tracebacks": 0, "traces": 0, "ablations": 0, "ignored": 0}
    failures, accepted = [], {}
    start = Path.cwd()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_mnist_like(folder / "data" / "MNIST" / "raw")
        write_mnist_like(folder / "data" / "MNIST" / "raw", count=64, split="test")  # the classifier's test split
        write_fashion_like(folder / "data")  # for lesson 05 runs whose autoencoder the capstone reads
        write_mnist_like(folder / "data" / "FashionMNIST" / "raw", count=64, split="test")  # utils.metrics' test split
        try:
            os.chdir(folder)  # compare_methods caches its classifier under ./outputs/metrics: keep it out of the repo
            write_folder(folder / "pictures")  # --dataset FOLDER: class subfolders of mixed pictures; FLAT: unlabelled
            write_folder(folder / "flat", classes=())
            places = {"FOLDER": str(folder / "pictures"), "FLAT": str(folder / "flat"),
                      "PICTURE": str(folder / "pictures" / "dogs" / "1.png"),
                      "BROKEN": str(folder / "pictures" / "cats" / "broken.png"),
                      "DATA": str(folder / "data"), "NOWHERE": str(folder / "nowhere"),
                      "MASK": str(folder / "mask.png")}
            mask = np.zeros((28, 28), np.uint8)
            mask[:, 14:] = 255
            Image.fromarray(mask).save(places["MASK"])

            def attempt(module_key, run_argv, out, kind, label, drawn, checkpoint_config=None, entry=None):
                """Run once and check it: one line, no trace if refused, and (for `drawn` flags) none ignored.
                Returns the exit code."""
                before, began = snapshot(out), time.perf_counter()
                code, lines, crash, noted, printed = smoke(modules[module_key], run_argv)
                seconds = time.perf_counter() - began
                counts["runs"] += 1
                status = "ok" if code == 0 else f"refused ({code}): {lines[0] if lines else ''}"
                problems = []
                reports = module_key == "getting_started"  # its "not ready" is a report on stdout, exit 1
                if crash is not None or not (code == 0 or (reports and code == 1 and not lines)
                                             or (code in (1, 2) and len(lines) == 1)):
                    counts["tracebacks"] += 1
                    problems.append(crash.strip().splitlines()[-1] if crash else f"exit {code}, {lines}")
                elif code != 0:
                    counts["refused"] += 1
                    if snapshot(out) != before:
                        counts["traces"] += 1
                        problems.append(f"the refused run changed {out.name}: {before} -> {snapshot(out)}")

                def result(made_out, text):  # what the run made: its files, and what it printed when that is its
                    # answer (utils.metrics' scores; GETTING_STARTED's report without its measured figures)
                    shown = {"metrics": text, "getting_started": re.sub(r"\d+(\.\d+)?", "N", text)}
                    return made_out, shown.get(module_key)

                made = result(written(out, before), printed) if code == 0 else None
                if code == 0:
                    key = entry or module_key
                    for flag in drawn:
                        if flag.startswith("--"):
                            accepted.setdefault(key, {}).setdefault(flag, 0)
                            accepted[key][flag] += 1
                if code == 0 and args.ablations:
                    candidates = [flag for flag in drawn if flag.startswith("--") and visible(flag, module_key)
                                  and flag not in noted
                                  and acts(modules[module_key], run_argv, flag, checkpoint_config)]
                    for flag in rng.sample(candidates, min(args.ablations, len(candidates))):
                        twin = folder / f"ablation{counts['ablations']}"
                        counts["ablations"] += 1
                        twin_argv = [str(twin) if value == str(out) else value for value in without(run_argv, flag)]
                        twin_code, _, twin_crash, _, twin_printed = smoke(modules[module_key], twin_argv)
                        if twin_crash is None and twin_code == 0 and result(written(twin, None), twin_printed) == made:
                            counts["ignored"] += 1
                            problems.append(f"{flag} was silently ignored: the run without it wrote the same files")
                if not args.quiet or problems:
                    print(f"{label} {kind} {' '.join(run_argv)}\n    {status} ({seconds:.1f} s)", flush=True)
                for problem in problems:
                    print(f"    FAILED: {problem}", flush=True)
                    failures.append(f"{label} {kind} {' '.join(run_argv)}: {problem}")
                return code

            shared_autoencoder = folder / "fashion_lesson05" / "checkpoint.pt"  # its autoencoder, for the capstone

            def fuzz_text(index, out):
                """examples/text_to_image.py on the autoencoder of lesson 05's checkpoint in `out` when it learnt
                fashion-mnist (the capstone's captions name its classes), else of a lesson 05 run made here once on
                fashion-mnist: trained, resumed, sampled."""
                autoencoder = out / "checkpoint.pt"
                if not (autoencoder.is_file() and torch.load(autoencoder, map_location="cpu", weights_only=True)
                        .get("config", {}).get("dataset") == "fashion-mnist"):
                    autoencoder = shared_autoencoder
                    if not autoencoder.is_file():
                        made = smoke(modules["05_latent_diffusion.py"] if "05_latent_diffusion.py" in modules
                                     else load_lesson("05_latent_diffusion.py"),
                                     ["--dataset", "fashion-mnist", "--data-dir", str(folder / "data"), "--out",
                                      str(autoencoder.parent), "--device", "cpu", "--max-steps", "2",
                                      "--autoencoder-width", "4", "--width", "4", "--batch-size", "16",
                                      "--timesteps", "25", "--num-samples", "1", "--steps", "2"])
                        assert made[0] == 0, made
                drawn = drawn_for("text")
                text_out = folder / f"text{index}"
                text = ["--autoencoder", str(autoencoder), "--data-dir", str(folder / "data"), "--out",
                        str(text_out), "--device", "cpu", *drawn]
                small = [] if "--epochs" in drawn else ["--max-steps", "40"]  # its cross-attention starts at 0:
                # in fewer steps the prompt, and so --guidance-scale, moves no sample by one 8-bit level
                small += unless_drawn(drawn, ("--steps", "3"), ("--num-samples", "1"))
                if attempt("text", [*text, *small], text_out, "train", "text_to_image", drawn, entry="text") == 0:
                    attempt("text", ["--resume", *text, *(["--max-steps", "42"] if "--epochs" not in drawn else []),
                                     "--steps", "3", "--num-samples", "1"], text_out, "resume", "text_to_image", [])
                    drawn = drawn_for("text")
                    text_config = torch.load(text_out / "checkpoint.pt", map_location="cpu",
                                             weights_only=True).get("config", {})
                    sample_out = folder / f"text_sampled{index}"
                    attempt("text", ["--sample-only", "--checkpoint", str(text_out / "checkpoint.pt"), "--out",
                                     str(sample_out), "--device", "cpu", *drawn,
                                     *unless_drawn(drawn, ("--steps", "3"), ("--num-samples", "1"))],
                            sample_out, "sample-only", "text_to_image", drawn, text_config, entry="text")

            def drawn_for(entry):
                return [places.get(flag, flag) for flag in draw(entry, rng, args.max_timesteps)]

            for index in range(args.runs):
                lesson = lessons[index % len(lessons)]
                flags = drawn_for(lesson)
                out = folder / f"out{index}"
                argv = ["--data-dir", str(folder / "data"), "--out", str(out), "--device", "cpu", *flags]
                if "--epochs" not in flags and "--autoencoder-epochs" not in flags:  # they exclude --max-steps
                    argv += ["--max-steps", rng.choice(["3", "4"])]
                diffusion = not (lesson == "05_latent_diffusion.py" and "autoencoder" in flags)  # lesson 05's stage 1
                if "--timesteps" not in flags and diffusion:  # refuses the flags of the diffusion model
                    argv += ["--timesteps", str(args.timesteps)]  # T = 1000 would spend minutes sampling
                if "--num-samples" not in flags and diffusion:
                    argv += ["--num-samples", "2"]  # nor would 64 samples (their count is drawn above)
                if lesson in ("02_ddpm.py", "03_conditional_ddpm.py") and "--warmup-steps" not in flags:
                    argv += ["--warmup-steps", "0"]  # the full learning rate from step 1: after a warm-up step of
                    # 1/200 of it the weights hardly move, and a flag's effect would not reach an 8-bit picture
                code = attempt(lesson, argv, out, "train", lesson, flags)
                if lesson == "05_latent_diffusion.py":
                    fuzz_text(index, out)
                if code != 0:
                    continue
                trained = (out / "checkpoint.pt").is_file()  # not by lesson 05's --stage autoencoder alone
                if trained:
                    config = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True).get("config", {})
                    base = ["--data-dir", str(folder / "data"), "--out", str(out), "--device", "cpu"]
                    if rng.random() < 0.25:  # kind 3: a fresh run failing at its first step, in this good run's folder
                        attempt(lesson, [*(without(argv, "--lr") if "--lr" in argv else argv), "--lr", "1e30"], out,
                                "failing", lesson, [])
                    # then continue it, and sample from it, with flags drawn afresh
                    resume = [*base, "--resume", *flags] if "--epochs" in flags or "--autoencoder-epochs" in flags \
                        else [*base, "--resume", "--max-steps", "5", *flags]
                    attempt(lesson, resume, out, "resume", lesson, [])
                    drawn = drawn_for(lesson)
                    sampled = [*base, "--sample-only", "--checkpoint", str(out / "checkpoint.pt"), *drawn]
                    sample_out = folder / f"sampled{index}"
                    sampled[3] = str(sample_out)  # into a folder of its own, so that what it wrote is what it made
                    attempt(lesson, sampled, sample_out, "sample-only", lesson, drawn, config)
                    if lesson in ("02_ddpm.py", "03_conditional_ddpm.py", "04_ddim_fast_sampling.py"):
                        edit = rng.choice(list(EDITS) if lesson == "03_conditional_ddpm.py" else ["sdedit", "inpaint"])
                        drawn = drawn_for(edit)
                        if edit == "translate" and "--class-label" not in drawn:  # required
                            drawn += ["--class-label", rng.choice(EDIT_FLAGS["--class-label"])]
                        edit_out = folder / f"edit{index}"
                        attempt("edit", [edit, "--data-dir", str(folder / "data"), "--out", str(edit_out), "--device",
                                         "cpu", "--checkpoint", str(out / "checkpoint.pt"), *drawn],
                                edit_out, "edit", lesson, drawn, config, entry=edit)
                    if lesson in ("02_ddpm.py", "04_ddim_fast_sampling.py"):  # scoring trains a classifier: rarely
                        scoring = [] if rng.random() < 0.2 else ["--no-metrics"]
                        drawn = drawn_for("compare")
                        # the default 1000 and 256 samples would take minutes: not what is fuzzed
                        small = unless_drawn(drawn, ("--num-samples", "2"), ("--ddpm-samples", "1"))
                        compare_out = folder / f"compare{index}"
                        attempt("compare", ["--data-dir", str(folder / "data"), "--out", str(compare_out), "--device",
                                            "cpu", "--checkpoint", str(out / "checkpoint.pt"), *scoring, *drawn,
                                            *small],
                                compare_out, "compare", lesson, drawn, config)
                if rng.random() < 0.3:  # a figure of utils.visualize, of this run's files or none
                    figure = rng.choice(list(FIGURES))
                    drawn = drawn_for(f"figure:{figure}")
                    files = {"loss": [str(out / "metrics.csv")], "samples": [str(out / "samples.npz")]}.get(figure, [])
                    if files and rng.random() < 0.2:
                        files.append(places["PICTURE"])  # a file of another kind among them
                    if figure in ("forward", "reverse"):
                        drawn += ["--data-dir", str(folder / "data")]
                        if "--reference" not in drawn and figure == "reverse":
                            drawn += ["--reference", "20"]  # the default 2000 images: seconds, not what is fuzzed
                    figure_out = folder / f"figure{index}"
                    attempt("visualize", [figure, *files, "--out", str(figure_out), *drawn], figure_out, "figure",
                            "utils.visualize", [flag for flag in drawn if flag != "--data-dir"],
                            entry=f"figure:{figure}")
                if rng.random() < 0.1 and (out / "samples.npz").is_file():  # scoring trains a classifier: rarely
                    drawn = drawn_for("metrics")
                    if "--dataset" not in drawn:
                        drawn += ["--dataset", "mnist"]  # required
                    cache = folder / "outputs" / "metrics"
                    attempt("metrics", [str(out / "samples.npz"), "--data-dir", str(folder / "data"), "--cache-dir",
                                        str(cache), *drawn], cache, "score", "utils.metrics", drawn, entry="metrics")
                if index % 5 == 0:  # GETTING_STARTED times the toy model for --seconds: now and then
                    drawn = drawn_for("getting_started")
                    given = {"NEW": str(folder / f"getting_started{index}")}
                    drawn = [given.get(value, value) for value in drawn]
                    if "--seconds" not in drawn:
                        drawn += ["--seconds", "0.2"]
                    if "--out" not in drawn:
                        drawn += ["--out", given["NEW"]]
                    gs_out = Path(drawn[drawn.index("--out") + 1])
                    attempt("getting_started", ["--offline", *drawn], gs_out, "check", "GETTING_STARTED",
                            [flag for flag in drawn if flag != "--out"])
        finally:
            os.chdir(start)
    return counts, failures, accepted


def main(argv=None):
    counts, failures, accepted = fuzz(parse_args(argv))
    print(", ".join(f"{count} {name}" for name, count in counts.items()))
    for entry in sorted(accepted):  # coverage of what is accepted: how often each flag was drawn in a run that ran
        never = sorted(set(flags_of(entry)) - set(accepted[entry]))
        print(f"accepted in {entry}: " + ", ".join(f"{flag} {count}" for flag, count in sorted(accepted[entry].items()))
              + (f"; never: {', '.join(never)}" if never else ""))
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
