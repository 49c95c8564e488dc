"""Run plumbing every lesson shares: argument checks, devices, atomic checkpoints, logging.

None of this is what a lesson teaches, so it lives here once instead of in five files.
Errors a user can fix are raised as `LessonError` and printed by `run` as one line.
"""
import argparse
import contextlib
import csv
import errno
import math
import os
import sys
import signal
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

CHECKPOINT_FORMAT = 1


class LessonError(Exception):
    """A problem the user can fix; `run` prints it as one line and exits with `exit_code`."""

    exit_code = 1


class Interrupted(LessonError):
    """Training stopped on Ctrl-C after saving a checkpoint (exit code 130, as shells expect)."""

    exit_code = 130


class StopRequest:
    """Within `with`, Ctrl-C (SIGINT) or SIGTERM sets `requested` so that a training loop can stop
    at the end of a step, with a consistent state to save; a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default in --help, except None: such flags say in their help what happens without them."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that shows defaults in --help and reports a bad value in one line (exit code 2)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _finite_float(text, accept, requirement):
    """argparse type helper: a finite float for which accept(value) holds, else a one-line error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    return _finite_float(text, lambda value: value > 0, "a finite number above 0")


def non_negative_float(text):
    """argparse type: a finite float >= 0."""
    return _finite_float(text, lambda value: value >= 0, "a finite number of at least 0")


def writable_dir(text):
    """argparse type: a folder that exists and is writable, or that can be created."""
    path = Path(text)
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {path}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {path}: {ancestor} is not writable")
    return path


class _RunRecord:
    """What the running command (run() below) has made so far, so that a failed or refused run can take it back.
    `made_dirs`: folders it created (make_out_dir), parents first, removed again when empty. `pending_logs`: fresh
    MetricsLogs that replace an earlier run's file at this run's first checkpoint save. `own_checkpoints`:
    checkpoints it saved or read (an earlier run's file is not "the last good" one). Until it saves a checkpoint
    (`saved`), its outputs are provisional: `new_outputs` (files it wrote where none was) are removed if it fails,
    and `replaced` maps each earlier file it wrote over to a hidden copy of it, put back if it fails."""

    def __init__(self):
        self.active = False  # inside run(): outside it (a test, a notebook) no copies are kept, nothing taken back
        self.reset()

    def reset(self):
        self.made_dirs, self.pending_logs, self.own_checkpoints = [], [], set()
        self.new_outputs, self.replaced, self.saved = [], {}, False

    def keep_outputs(self):
        """This run's outputs are its own now (it saved a checkpoint or ended well): drop the earlier files' copies."""
        for copy in self.replaced.values():
            copy.unlink(missing_ok=True)
        self.replaced.clear()
        self.new_outputs.clear()


_this_run = _RunRecord()


def make_out_dir(path):
    """Create the output folder `path` with its missing parents, remembering which folders this created: when the
    run then fails or is refused (run() below), those that are still empty are removed again, so that a refused
    command leaves no trace. Returns `path` as a Path."""
    path = Path(path)
    missing, folder = [], path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    path.mkdir(parents=True, exist_ok=True)
    _this_run.made_dirs.extend(reversed(missing))
    return path


def _forget_failed_run():
    """After a failed or refused run: drop its pending metrics files; when it saved no checkpoint, remove the output
    files it wrote where none was and put back the earlier ones it wrote over; then remove the output folders it
    made, when empty."""
    for log in _this_run.pending_logs:
        log.discard()
    if not _this_run.saved:  # nothing of this run is worth keeping: the figures it drew before failing go too
        for output in _this_run.new_outputs:
            output.unlink(missing_ok=True)
        for output, copy in _this_run.replaced.items():
            with contextlib.suppress(OSError):
                os.replace(copy, output)
    _this_run.keep_outputs()  # (the copies that were not put back go)
    for folder in reversed(_this_run.made_dirs):
        with contextlib.suppress(OSError):  # not empty (a checkpoint was saved there), or already gone
            folder.rmdir()
    _this_run.reset()


def write_failure(path, error, kept="the previous file there is untouched"):
    """A LessonError in one line for an OSError or RuntimeError (torch.save reports a full disk as a RuntimeError
    'enforce fail at inline_container.cc') raised while writing `path`: what ran out, and what was kept."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = None
    if getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < 16 * 2 ** 20):
        reason = f"the disk is full ({free // 2 ** 20 if free is not None else '?'} MiB free)"
    else:
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
    return LessonError(f"could not write {path}: {reason}; {kept}")


@contextlib.contextmanager
def atomic_output(path):
    """Write an output file all at once: `with atomic_output(path) as temporary: save(temporary)` writes to a
    hidden file beside `path` (with the same extension, which imageio, matplotlib and numpy read the format from)
    and renames it onto `path` only when the save finished. Ctrl-C, a crash or a full disk mid-write leave the
    earlier `path` as it was and no partial file; a full disk or another write error raises LessonError (one
    line). Inside run(), before the run's first checkpoint, the file is provisional: a failure removes it, or puts
    the earlier file back (see _RunRecord). Yields the temporary Path."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        if _this_run.active and not _this_run.saved:
            _remember_earlier(path)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        temporary.unlink(missing_ok=True)
        raise write_failure(path, error) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _remember_earlier(path):
    """Before `path` is written over by a run that has saved nothing yet: note it as new, or keep a hidden copy of
    the earlier file beside it (a hard link, which costs nothing; a copy where links are not allowed)."""
    if path in _this_run.replaced or path in _this_run.new_outputs:
        return  # the earliest file is the one to put back
    if not path.exists():
        _this_run.new_outputs.append(path)
        return
    copy = path.with_name(f".{path.stem}.earlier{path.suffix}")
    copy.unlink(missing_ok=True)  # (left by a run killed with SIGKILL: the file at `path` is the one to keep)
    try:
        os.link(path, copy)
    except OSError:
        shutil.copy2(path, copy)
    _this_run.replaced[path] = copy


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def pick_device(name):
    """'auto' picks CUDA, then Apple MPS, then CPU; a named device must be available."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LessonError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    if name == "mps" and not has_mps:
        raise LessonError("--device mps was asked for, but Apple MPS is not available here")
    if name == "cpu":
        # PyTorch may default to fewer threads than the cores this process may use.
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return torch.device(name)


def save_checkpoint(state, path):
    """Write `state` to `path` atomically: an interrupted save leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save (SIGKILL)
        stale.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        Path(temporary).unlink(missing_ok=True)
        raise write_failure(path, error, last_good(path)) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    _this_run.own_checkpoints.add(path.resolve())
    _this_run.saved = True
    _this_run.keep_outputs()
    for log in [log for log in _this_run.pending_logs if log.path.parent.resolve() == path.parent.resolve()]:
        log.commit()  # the folder now holds this run's checkpoint: its metrics.csv becomes this run's too


def load_checkpoint(path, lesson):
    """Load a checkpoint of `lesson` (a name, or a tuple of names any of which will do) safely
    (weights_only: it never runs code) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise LessonError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LessonError(f"{path} is not a readable checkpoint (truncated, corrupt or unsafe): {reason}") from None
    if not isinstance(state, dict) or "lesson" not in state or "format" not in state:
        raise LessonError(f"{path} is not a checkpoint of this course")
    lessons = (lesson,) if isinstance(lesson, str) else tuple(lesson)
    if state["lesson"] not in lessons:
        raise LessonError(f"{path} is a checkpoint of lesson {state['lesson']}, not of {' or '.join(lessons)}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise LessonError(f"{path} has checkpoint format {state['format']}, this code reads format {CHECKPOINT_FORMAT}")
    _this_run.own_checkpoints.add(path.resolve())
    return state


def last_good(path):
    """For a message after training failed: where the last good checkpoint is, that there is none yet, or, for a
    fresh run in the folder of an earlier one that it has not yet saved over, that the earlier run is untouched."""
    path = Path(path)
    if not path.is_file():
        return f"no checkpoint was saved yet ({path})"
    if path.resolve() in _this_run.own_checkpoints:
        return f"the last good checkpoint is {path}"
    return f"this run saved nothing, and the earlier run's {path} and metrics are untouched"


def require_same(saved_config, config, keys, path):
    """Refuse to resume when the architecture or data of a checkpoint differ from this run's."""
    for key in keys:
        if saved_config.get(key) != config.get(key):
            raise LessonError(
                f"{path} was trained with {key}={saved_config.get(key)}, this run has {key}={config.get(key)}"
            )


_UNSET = object()


def given_flags(parser, argv=None):
    """The dests of the flags written on the command line `argv` (sys.argv[1:] when None), abbreviations included:
    argparse fills in a default only where the namespace it is handed has no value yet, so a namespace preset to a
    marker keeps the marker exactly where the user gave nothing. Call it after parse_args has accepted argv."""
    probe = argparse.Namespace(**{action.dest: _UNSET for action in parser._actions
                                  if action.dest != argparse.SUPPRESS})
    parser.parse_args(argv, probe)
    return {dest for dest, value in vars(probe).items() if value is not _UNSET}


def flag(dest):
    """'max_steps' -> '--max-steps'."""
    return "--" + dest.replace("_", "-")


def refuse_unused(args, dests, reason):
    """LessonError (one line) when the user gave any of the flags `dests` (their argparse dests), which do nothing
    in this run, for `reason` (e.g. "with --sample-only: it trains nothing"). args.given is given_flags' set."""
    unused = [flag(dest) for dest in dests if dest in getattr(args, "given", ())]
    if unused:
        raise LessonError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} nothing {reason}; leave "
                          f"{'it' if len(unused) == 1 else 'them'} out")


def refuse_different(args, config, dests, path):
    """LessonError (one line) when a flag the user gave (args.given) asks for another value than the checkpoint at
    `path` was trained with (config[dest]); a flag left out, or given the checkpoint's value, is accepted."""
    for dest in dests:
        if dest in getattr(args, "given", ()):
            chosen, saved = getattr(args, dest), config.get(dest)
            if (list(chosen) if isinstance(chosen, tuple) else chosen) != saved:
                shown = ",".join(map(str, chosen)) if isinstance(chosen, (list, tuple)) else chosen
                raise LessonError(f"{path} was trained with {dest}={saved}, not {flag(dest)} {shown}: the network "
                                  f"comes from the checkpoint; leave {flag(dest)} out")


def same_weights(saved, current):
    """True when two state dicts (name -> tensor; `current` may live on any device) hold the same names and
    exactly the same values, as a resumed run needs of the network whose outputs it learned (lesson 05's
    autoencoder, for its diffusion stage and the capstone)."""
    return saved.keys() == current.keys() and all(torch.equal(value, current[name].cpu())
                                                  for name, value in saved.items())


def check_resume_length(start, total_steps, path):
    """With --resume: LessonError (one line) when the run's length (--max-steps or --epochs, in steps) is below
    the step the checkpoint at `path` has reached, which would train nothing and report a length it never ran."""
    if start is not None and total_steps < start["step"]:
        raise LessonError(f"{path} is at step {start['step']}, past the {total_steps} steps this run asks for: "
                          f"give --max-steps or --epochs beyond it, or sample it with --sample-only")


def check_timesteps(parser, timesteps, linear=False, beta_end=0.02):
    """--timesteps T (None: not given) must be at least 2; with DDPM's linear schedule, whose betas run to beta_end
    x 1000 / T (DDPM Section 4 scaled to T steps), also more than beta_end x 1000, so that the last beta stays below
    1. parser.error (exit 2, one line) otherwise; the one rule of every lesson."""
    if timesteps is None:
        return
    if timesteps < 2 or linear and beta_end * 1000 / timesteps >= 1:
        parser.error(f"--timesteps must be at least 2, and more than {round(beta_end * 1000)} with the linear schedule "
                     f"(its last beta, {beta_end:g} x 1000 / T, must stay below 1); got {timesteps}")


def check_steps(steps, timesteps, path):
    """Sampling a checkpoint at `path` trained with T = `timesteps`: LessonError (one line) when the sampler's
    --steps (None: not given) is more than T, since it can visit only T timesteps and would silently take fewer."""
    if steps is not None and steps > timesteps:
        raise LessonError(f"--steps {steps} is more than the {timesteps} timesteps {path} was trained with")


def saved_timesteps(config, chosen, path, default=1000):
    """The number of diffusion steps T to use with a checkpoint: the one in its config (`default` for checkpoints
    saved before --timesteps existed). A network trained for one T does not fit another: raises LessonError
    when --timesteps (`chosen`, None when not given) asks for a different one."""
    saved = config.get("timesteps", default)
    if chosen is not None and chosen != saved:
        raise LessonError(f"{path} was trained with --timesteps {saved}; it cannot be used with --timesteps {chosen}")
    return saved


SAMPLE_BATCH_SIZE = 64  # images per sampling batch: within 8% of the fastest per image for the 28x28 networks
# of lessons 01-04, where one batch of 1000 ran 2.3-3.2x slower per image (benchmarks/sample_batch.py; docs/lesson04.md "Sampling many images")


def in_batches(count, batch_size, draw):
    """Sample `count` images in batches of at most `batch_size`: draw(start, n) returns (images [n, ...], extra)
    for the items start .. start + n - 1. Returns all images concatenated on the CPU, and the first batch's
    extra (the snapshots the denoising figures show). One big batch is slower per image on a CPU than several
    small ones, and needs memory in proportion to it."""
    images, first_extra = [], None
    for start in range(0, count, batch_size):
        batch, extra = draw(start, min(batch_size, count - start))
        images.append(batch.cpu())
        first_extra = extra if start == 0 else first_extra
    return torch.cat(images), first_extra


class MetricsLog:
    """Appends rows of (step, loss, lr, images_per_s) to a CSV file, one flush per row. A fresh run (append False)
    where an earlier run's file is writes to a hidden file beside it, which replaces the earlier file when this run
    saves its first checkpoint in that folder (save_checkpoint) or ends well (close): a fresh run that fails first
    leaves the earlier run's metrics as they were. A fresh run where no file was writes the file itself (to be
    watched while it trains) and removes it again if it fails before saving a checkpoint (no trace, issue 38)."""

    FIELDS = ("step", "loss", "lr", "images_per_s")

    def __init__(self, path, append):
        self.path = Path(path)
        fresh = not (append and self.path.is_file())
        self.pending = self.path.with_name(f".{self.path.name}.new") if fresh and self.path.exists() else None
        self.file = open(self.pending or self.path, "w" if fresh else "a", newline="")
        self.writer = csv.writer(self.file)
        if fresh or self.path.stat().st_size == 0:  # (empty: a run killed before its header reached the disk)
            self.writer.writerow(self.FIELDS)
            self.file.flush()
        self.created = fresh and self.pending is None  # this run made the file: its own to remove if it fails
        if self.pending is not None or self.created:
            _this_run.pending_logs.append(self)

    def write(self, step, loss, lr, images_per_s):
        self.writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{images_per_s:.1f}"])
        self.file.flush()

    def commit(self):
        """Put this run's rows in place of the earlier run's file (the open file follows the rename)."""
        if self.pending is not None:
            os.replace(self.pending, self.path)
            self.pending = None
        if self in _this_run.pending_logs:
            _this_run.pending_logs.remove(self)
        self.created = False

    def discard(self):
        """This run failed before saving anything: remove its rows, keep the earlier run's file (or none)."""
        if self.pending is not None:
            self.file.close()
            self.pending.unlink(missing_ok=True)
            self.pending = None
        elif self.created:
            self.file.close()
            self.path.unlink(missing_ok=True)
            self.created = False

    def close(self):
        self.file.close()


# --- a training loop's bookkeeping: each lesson's train() tells the diffusion, these keep the books ---

class EpochOrder:
    """Which training images each step uses. batch(step) -> their indices [batch_size], int64 on the CPU: a fresh
    shuffle every epoch, drawn from a generator seeded with seed + epoch, so that a run continued with --resume at
    any step draws exactly the batches of an uninterrupted one. Each epoch has `steps_per_epoch` steps; the images
    left over after the last full batch wait for the next shuffle. `shuffle(epoch)` -> a permutation replaces
    the default one (lesson 02 passes each process its share of DistributedSampler's)."""

    def __init__(self, count, batch_size, steps_per_epoch, seed, shuffle=None):
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.shuffle = shuffle or (lambda epoch: torch.randperm(count, generator=torch.Generator().manual_seed(
            seed + epoch)))
        self.epoch, self.order = None, None

    def batch(self, step):
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, self.shuffle(epoch)
        return self.order[position * self.batch_size:(position + 1) * self.batch_size]


class TrainingLog:
    """What a run shows and keeps of training: a progress bar, and every `every` steps a row of metrics.csv at
    `path` (MetricsLog) with the mean loss of those steps, the learning rate and images per second (images_per_step
    images each step, all processes together). With enabled=False (processes other than rank 0) it shows and
    writes nothing. close() prints how long training took, when it trained at all."""

    def __init__(self, path, total_steps, start_step, images_per_step, every, append, desc="training", enabled=True):
        self.total_steps, self.images_per_step, self.every, self.desc = total_steps, images_per_step, every, desc
        self.metrics = MetricsLog(path, append) if enabled else None
        self.progress = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", disable=not enabled)
        self.started, self.first_step, self.last_step = time.perf_counter(), start_step, start_step
        self.loss_sum, self.window_steps, self.window_start = 0.0, 0, self.started

    def add(self, step, loss, lr):
        """Record `loss` (a float) of the step that made the step count `step`, trained at learning rate `lr`."""
        self.progress.update(1)
        self.loss_sum, self.window_steps, self.last_step = self.loss_sum + loss, self.window_steps + 1, step
        if step % self.every == 0 or step == self.total_steps:
            mean, speed = self.loss_sum / self.window_steps, (
                self.window_steps * self.images_per_step / (time.perf_counter() - self.window_start))
            if self.metrics is not None:
                self.metrics.write(step, mean, lr, speed)
            self.progress.set_postfix(loss=f"{mean:.4f}", img_s=f"{speed:.0f}")
            self.loss_sum, self.window_steps, self.window_start = 0.0, 0, time.perf_counter()

    def close(self):
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
            if self.last_step > self.first_step:  # not when --resume found the run already finished
                print(f"{self.desc.replace('training', 'trained', 1)} in "
                      f"{(time.perf_counter() - self.started) / 60:.1f} min ({self.last_step - self.first_step} steps)")


def set_learning_rate(optimizer, lr):
    """Give every parameter group of `optimizer` the learning rate `lr` for the next step."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_learning_rate(step, peak, warmup_steps):
    """Linear warm-up from peak / warmup_steps to `peak` over `warmup_steps` steps, then constant (lessons 02-05;
    DDPM's released code warms up over 5000 steps). step is 0-based; warmup_steps = 0 means no warm-up."""
    return peak * min(1.0, (step + 1) / warmup_steps) if warmup_steps else peak


def ema_decay_note(ema, total_steps):
    """A one-line note when an EMA's chosen decay never takes effect in a run, else None.

    `ema` is a lesson's EMA: `ema.decay` is --ema-decay, in [0, 1), and `ema.decay_at(n)` the decay it averages with
    at 0-based step n, which rises with n during its warm-up and equals `ema.decay` once the warm-up reaches it
    (lessons 02, 03 and 05: min(decay, (1 + n) / (10 + n)), the warm-up diffusers' EMAModel uses by default; with
    0.999 that is from step 8990 on). A shorter run averages with the warm-up's decay throughout, whatever
    --ema-decay says, and the learner should be told. total_steps >= 1: the steps of this run in all. The first step
    at the decay is found by bisection on the lesson's own decay_at, so the note follows its warm-up, whatever it is.
    Raises ValueError if decay_at has not reached the decay by step 2^40.
    """
    high = 1
    while ema.decay_at(high) < ema.decay:  # doubling to a step that uses the chosen decay
        high *= 2
        if high > 2 ** 40:
            raise ValueError(f"the EMA's warm-up never reaches its decay {ema.decay}")
    low = 0
    while low < high:  # bisection: decay_at(high) >= decay throughout, and every step before `low` is below it
        middle = (low + high) // 2
        if ema.decay_at(middle) >= ema.decay:
            high = middle
        else:
            low = middle + 1
    if low < total_steps:
        return None
    last = math.floor(ema.decay_at(total_steps - 1) * 10 ** 4) / 10 ** 4  # rounded down: never shown as reached
    steps = f"these {total_steps} steps" if total_steps > 1 else "this 1 step"
    return (f"note: --ema-decay {ema.decay} takes effect only from step {low}; in {steps} the EMA's warm-up "
            f"(EMA.decay_at) sets the decay throughout (up to {last:.4f} at the last step)")


def check_finite(loss, step, checkpoint_path, what="loss"):
    """Raise LessonError in one line when the float `loss` is inf or nan, naming the last good checkpoint."""
    if not math.isfinite(loss):
        raise LessonError(f"the {what} became {loss} at step {step}; {last_good(checkpoint_path)} "
                          f"(try a lower learning rate)")


def checkpoint_due(step, total_steps, every, stopping):
    """Whether to save after step `step`: every `every` steps, at the end, and when stopping on Ctrl-C."""
    return step % every == 0 or step == total_steps or stopping


def stopped_early(step, total_steps, checkpoint_path, what=""):
    """The Interrupted error for a run that stopped on Ctrl-C at `step` (exit code 130, one line)."""
    return Interrupted(f"interrupted at step {step} of {total_steps}{what}; checkpoint saved to {checkpoint_path}; "
                       f"continue with --resume")


def mean_over_processes(values, world_size, device):
    """The mean of a few floats over the processes of a torchrun run (each process passes its own), so that all
    of them take the same decisions; with one process, the values as they are. float32 on `device` (NCCL reduces
    only GPU tensors; MPS has no float64)."""
    if world_size == 1:
        return list(values)
    values = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(values)
    return (values / world_size).tolist()


def _close_progress_bars():
    """Close the tqdm bars an exception left open, so that the message below starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _end_well():
    """After a run that ended well: its metrics (when no checkpoint in their folder committed them, as when there
    was nothing to train) replace the earlier run's, and its outputs are its own."""
    for log in list(_this_run.pending_logs):
        log.commit()
    _this_run.keep_outputs()


def run(main):
    """Call `main()`; print a LessonError as one line (exit 1) and Ctrl-C without a traceback (exit 130). A run
    that fails or is refused leaves no trace and loses nothing: a fresh run's metrics that never replaced an earlier
    run's are dropped; when it saved no checkpoint, the output files it wrote where none was (atomic_output) are
    removed and the earlier ones it wrote over are put back; and then the output folders it made (make_out_dir),
    when empty, are removed."""
    _this_run.reset()
    _this_run.active = True
    try:
        main()
    except LessonError as error:
        _close_progress_bars()
        _forget_failed_run()
        sys.stderr.write(f"error: {error}\n")
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        _close_progress_bars()
        _forget_failed_run()
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except SystemExit as exit_info:
        if exit_info.code not in (0, None):
            _forget_failed_run()
        else:
            _end_well()
        raise
    except BaseException:
        _forget_failed_run()
        raise
    else:
        _end_well()
    finally:
        _this_run.reset()
        _this_run.active = False
