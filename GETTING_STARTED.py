"""Start here: is this machine ready for the lessons, how long will each take here, and in what order.

    python GETTING_STARTED.py                  # check everything, time the toy model, print the learning path
    python GETTING_STARTED.py --device cuda    # the same for a GPU

It checks Python and the packages against requirements.txt, lists the devices PyTorch can use, looks for
the datasets on this machine (and whether the network could fetch them), checks that the output folder
can be written and has room, then times a few training steps of lesson 01's model and predicts each
lesson's default run time from that. It ends with the learning path and fixes for common problems.
It exits with status 1, saying why, when this machine cannot run the lessons; warnings alone do not fail it.
"""
import contextlib
import importlib.metadata
import math
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from examples.lessons import load_lesson  # the one loader of lesson files (imports no lesson by itself)

ROOT = Path(__file__).resolve().parent
MIN_PYTHON = (3, 9)
MIN_FREE_GIB = 0.5  # a run writes a few MB; a dataset download needs up to 0.2 GB (CIFAR-10)
TIMED_SECONDS = 3.0  # how long to time the toy model (after warm-up)
PROBE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's first MNIST mirror

# Each lesson's default CPU run as measured on the development machine (a 2-core AMD EPYC VM;
# docs/experiments/2026-11_default_runs.md "Results (2026-11-23 to 2026-11-29)"): (wall minutes, images/s of lesson
# 01's default model on that machine that day). The VM's speed varies from day to day, and not by the same factor
# for every lesson, so a lesson measured on two days predicts from both (predicted_minutes). Day 1: lesson 01's run
# trained at ~600 images/s (its own log); lessons 02 and 03 ran on the day benchmarks/lesson01_speed.py measured 707
# images/s. Day 2 (2026-11-23): all five in one `python benchmarks/quality.py` with nothing else running; this
# script then measured 330 and 325 images/s (`python GETTING_STARTED.py --offline --seconds 10`, twice), and lesson
# 01's run logged 325. Lessons 04 and 05 use day 2 alone: day 1 has no measured speed for them. Lesson 01 uses day 3
# alone (2026-11-30, its recipe since then: 6 epochs in the channels_last layout): `python 01_ddpm_toy.py` ran 9.1
# min, and this script measured 670 and 630 images/s just before and after it.
DAY_2_RATE = 328
LESSONS = [
    ("01_ddpm_toy.py", "the forward process, a small noise-predicting U-Net, the simple loss (min-SNR weighted), DDPM sampling",
     ((9.1, 650),)),
    ("02_ddpm.py", "the full DDPM: ResNet U-Net + attention, cosine schedule, EMA, checkpoints, mixed precision",
     ((23.6, 707), (37.1, DAY_2_RATE))),
    ("03_conditional_ddpm.py", "class-conditional generation and classifier-free guidance",
     ((23.7, 707), (35.2, DAY_2_RATE))),
    ("04_ddim_fast_sampling.py --checkpoint outputs/02_ddpm/checkpoint.pt",
     "DDIM: 50 steps instead of 1000 on lesson 02's model, determinism, inversion (run lesson 02 first)",
     ((1.4, DAY_2_RATE),)),
    ("05_latent_diffusion.py", "an autoencoder, then diffusion in its latent space: the idea of Stable Diffusion",
     ((21.9, DAY_2_RATE),)),
    # the capstone: its default run took 17.9 min on a 2-core AMD EPYC VM, and this script measured 290 images/s
    # right after it (docs/text_to_image.md "Run it")
    ("examples/text_to_image.py", "the capstone: a typed prompt, a text encoder, cross-attention and guidance on "
     "lesson 05's autoencoder (run lesson 05 first)", ((17.9, 290),)),
]


def predicted_minutes(runs, rate):
    """A lesson's minutes where lesson 01's model trains at `rate` images/s. Each measured run's minutes x that
    day's rate is the run's work in toy-model images; over several days take their geometric mean (a run twice
    as slow and one twice as fast cancel), then divide by the speed measured here."""
    work = math.exp(sum(math.log(minutes * day_rate) for minutes, day_rate in runs) / len(runs))
    return work / rate


TROUBLESHOOTING = """\
Troubleshooting
  - "mnist is not available here ... using fashion-mnist": no network. That is fine: the lessons use Fashion-MNIST.
    To get it offline on Debian or Ubuntu: sudo apt-get install dataset-fashion-mnist. Or copy MNIST's four
    files (train-images-idx3-ubyte.gz, ...) into data/MNIST/raw/.
  - A run was stopped (Ctrl-C, closed laptop): run the same command with --resume; it continues exactly.
  - Too slow: --max-steps N or --epochs N trains for less (pictures get blurrier); close other programs, which
    compete for the same cores.
  - "CUDA out of memory": a smaller --batch-size. "MPS" errors on a Mac: --device cpu.
  - "... is a checkpoint of lesson ...": each lesson reads its own checkpoints (lesson 04 also reads lesson 02's).
    Point --checkpoint at the right file, or use a new --out folder.
  - Anything else: the error line names the problem; every lesson lists its flags with --help."""


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class Report:
    """Collects what the checks found: problems stop the lessons, warnings do not."""

    def __init__(self):
        self.problems, self.warnings = [], []

    def ok(self, text):
        print(f"  ok    {text}")

    def warn(self, text):
        self.warnings.append(text)
        print(f"  warn  {text}")

    def fail(self, text):
        self.problems.append(text)
        print(f"  FAIL  {text}")


# --- versions ---

def version_tuple(text):
    """'2.14.1+cu130' -> (2, 14, 1): the numeric release part, for comparisons."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0].split("rc")[0])[:3])


def satisfies(version, specifier):
    """Whether `version` meets a requirement specifier such as '>=2.3,<3' (>=, >, <=, <, ==, != only)."""
    operators = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
                 "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    have = version_tuple(version)
    for clause in filter(None, (part.strip() for part in specifier.split(","))):
        operator = re.match(r"[<>=!]=?", clause).group(0)
        want = version_tuple(clause[len(operator):])
        width = max(len(have), len(want))  # 3 == 3.0.0
        if not operators[operator](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
            return False
    return True


def read_requirements(path):
    """requirements.txt -> [(package, specifier)], comments and blank lines skipped."""
    requirements = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, specifier = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
            requirements.append((name, specifier.replace(" ", "")))
    return requirements


def check_versions(report, requirements_path):
    print("Python and packages")
    if sys.version_info[:2] < MIN_PYTHON:
        report.fail(f"Python {sys.version.split()[0]}: the lessons need {'.'.join(map(str, MIN_PYTHON))} or newer")
    else:
        report.ok(f"Python {sys.version.split()[0]}")
    for name, specifier in read_requirements(requirements_path):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            report.fail(f"{name} is not installed: pip install -r requirements.txt")
            continue
        if satisfies(version, specifier):
            report.ok(f"{name} {version} ({specifier or 'any version'})")
        else:
            report.fail(f"{name} {version} does not meet {specifier}: pip install -r requirements.txt")


# --- devices ---

def check_devices(report, device_name):
    """Lists what PyTorch can use; returns the device the lessons will pick, or None."""
    import torch

    from utils.runtime import LessonError, pick_device

    print("Devices")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            report.ok(f"CUDA {index}: {properties.name}, {properties.total_memory / 2 ** 30:.0f} GiB")
    else:
        print(f"  {'-':<6}no CUDA GPU")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    print(f"  {'ok' if mps else '-':<6}Apple MPS {'available' if mps else 'not available'}")
    cores = usable_cores()
    try:
        device = pick_device(device_name)
    except LessonError as error:
        report.fail(str(error))
        return None
    report.ok(f"CPU: {cores} cores usable, PyTorch uses {torch.get_num_threads()} threads")
    report.ok(f"--device {device_name} gives {device}")
    return device


# --- data and disk ---

def network_reachable(url=PROBE_URL, timeout=3.0):
    """Whether a dataset mirror answers at all (any HTTP status counts: the network works)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def check_data(report, data_dir, online=None):
    from utils import data

    print(f"Datasets (--data-dir {data_dir})")
    found = {name: data.find_local(name, data_dir) for name in data.DATASETS}
    for name, where in found.items():
        print(f"  {'ok' if where else '-':<6}{name}: {'on this machine, ' + where if where else 'not on this machine'}")
    online = network_reachable() if online is None else online
    print(f"  {'ok' if online else '-':<6}network: " + ("a dataset mirror answers; missing datasets will download"
                                                        if online else "no dataset mirror answers (offline)"))
    if found["mnist"] or found["fashion-mnist"] or online:
        report.ok("the lessons have data" + ("" if found["mnist"] or online else
                                             ": Fashion-MNIST will stand in for MNIST"))
    else:
        report.fail("no MNIST or Fashion-MNIST here and no network to fetch them: "
                    "sudo apt-get install dataset-fashion-mnist, or copy the files into "
                    f"{Path(data_dir) / 'MNIST' / 'raw'}")


def check_output(report, out):
    print(f"Output folder ({out})")
    missing, folder = [], out  # the folders this check makes to try writing there; it removes them again
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
        free = shutil.disk_usage(out).free / 2 ** 30
    except OSError as error:
        report.fail(f"cannot write to {out}: {error.strerror or error}")
        return
    finally:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
    if free < MIN_FREE_GIB:
        report.fail(f"{free:.2f} GiB free under {out}; the lessons need at least {MIN_FREE_GIB} GiB")
    else:
        report.ok(f"writable, {free:.1f} GiB free")


# --- speed ---

def toy_speed(device, seconds=TIMED_SECONDS, batch=128):
    """Training images/s of lesson 01's default model and step (forward, backward, Adam) on `device`, at batch 128
    in the default memory layout: the unit LESSONS' runs were timed in (lesson 01 itself now trains at batch 64
    in channels_last on a CPU; its entry was measured with this same probe)."""
    import torch

    lesson = load_lesson("01_ddpm_toy.py")
    generator = torch.Generator(device=device).manual_seed(0)
    model = lesson.TinyUNet(1, 16).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = lesson.make_schedule(device)
    images = torch.rand((batch, 1, 28, 28), device=device, generator=generator) * 2 - 1

    def step():
        loss = lesson.loss_fn(model, images, schedule, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: allocations, kernels, caches
        step()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or steps < 3:
        step()
        steps += 1
        synchronize()
    return steps * batch / (time.perf_counter() - started)


def learning_path(rate, device):
    print("Learning path (one lesson at a time; read the file after it runs)")
    for index, (command, teaches, runs) in enumerate(LESSONS, start=1):
        if device.type == "cpu":
            here = predicted_minutes(runs, rate)
            estimate = f"about {here:.0f} min here" if here >= 1.5 else f"about {here * 60:.0f} s here"
        else:
            estimate = "minutes on a GPU (README 'The lessons')"
        print(f"  {index}. python {command}\n       {teaches}\n       {estimate}")
    if device.type == "cpu":
        print("  (Times scale each lesson's measured runs by lesson 01's speed here. Lessons with larger networks\n"
              "   do not slow down in step with it: on the development machine, on the two days measured, these\n"
              "   predictions missed lessons 02 and 03 by up to 21% either way. Treat them as rough.)")


def positive_seconds(text):
    """argparse type of --seconds: a finite number above 0 (0 or less would time nothing but the 3 steps the probe
    always takes, and say nothing). Raises argparse.ArgumentTypeError otherwise."""
    import argparse

    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return seconds


def parse_args(argv=None):
    """The command line. A bad value is refused in one line, exit 2, as every lesson refuses one (utils.runtime's
    ArgumentParser, which this file cannot import before it has checked that torch is installed)."""
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message):
            sys.stderr.write(f"{self.prog}: error: {message}\n")
            sys.exit(2)

    parser = OneLineParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--data-dir", default="data", help="where the lessons look for datasets first")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="where the lessons write")
    parser.add_argument("--seconds", type=positive_seconds, default=TIMED_SECONDS, help="how long to time the toy model")
    parser.add_argument("--offline", action="store_true", help="do not probe the network")
    return parser.parse_args(argv)


def main(argv=None):
    """Run every check and print the report; returns the exit status (0 ready, 1 not)."""
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    report = Report()
    check_versions(report, ROOT / "requirements.txt")
    if report.problems:  # without the packages nothing else can be checked
        print(f"\nNot ready: {report.problems[0]}")
        return 1
    device = check_devices(report, args.device)
    check_data(report, args.data_dir, online=False if args.offline else None)
    check_output(report, args.out)
    if device is not None:
        print("Speed")
        cores = usable_cores()
        if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * cores:
            report.warn(f"other programs are keeping the CPU busy (load {os.getloadavg()[0]:.1f} on {cores} cores): "
                        f"the speed below and the predicted times are slower than this machine can do")
        rate = toy_speed(device, args.seconds)
        report.ok(f"lesson 01's model trains at {rate:.0f} images/s on {device} (batch 128)")
        print()
        learning_path(rate, device)
    print()
    print(TROUBLESHOOTING)
    print()
    if report.problems:
        print(f"Not ready: {len(report.problems)} problem(s). First: {report.problems[0]}")
        return 1
    print("Ready." + (f" {len(report.warnings)} warning(s) above." if report.warnings else "")
          + " Start with: python 01_ddpm_toy.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
