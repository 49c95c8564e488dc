"""Edit real images with a trained model: SDEdit, inpainting (RePaint) and class translation.

    python examples/edit_images.py sdedit --checkpoint outputs/02_ddpm/checkpoint.pt --input my_picture.png
    python examples/edit_images.py inpaint --checkpoint outputs/02_ddpm/checkpoint.pt --test-index 3 --mask left
    python examples/edit_images.py translate --checkpoint outputs/03_conditional_ddpm/checkpoint.pt \\
        --test-index 0 --class-label 5

Papers: Meng, He, Song, Song, Wu, Zhu & Ermon, "SDEdit: Guided Image Synthesis and Editing with Stochastic
        Differential Equations", 2022, arXiv:2108.01073;
        Lugmayr, Danelljan, Romero, Yu, Timofte & Van Gool, "RePaint: Inpainting using Denoising Diffusion
        Probabilistic Models", 2022, arXiv:2201.09865.
Builds on: lesson 04's DDIM step and its network calls (loaded from the lesson file, as compare_methods does), on
lesson 02 or 04 checkpoints (eps, v or flow), and lesson 03's classifier-free guidance on its checkpoints.
  - SDEdit: noise the input to t0 = strength x T with q(x_t0 | x_0) (DDPM Eq. 4), then denoise from t0 with
    DDIM. Low strength keeps the input; strength 1 is ordinary sampling from that noise.
  - Inpainting: at every step the known pixels are replaced by the input noised to that step (RePaint Algorithm 1),
    so the model only has to fill the hole; --resample R goes back and forth R times per step (RePaint
    Algorithm 1 with jumps of one step), which lets the filled part agree with the kept part.
  - Class translation: SDEdit with lesson 03's guided prediction towards --class-label.
Left out: lesson 05's latent space (the same edits would run on its latents).
The input is an image file (resized and converted like a folder dataset's pictures) or --test-index, an image of
the checkpoint's dataset (its test split; for an image folder, its images). Writes to --out (default
outputs/edit_images/): sdedit.png (and sdedit.csv with --measure), inpaint.png, or translate.png (and
translate.csv with --measure).
"""
import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: lessons and utils live one folder up

from examples.lessons import load_lesson  # noqa: E402
from utils import data, metrics, visualize  # noqa: E402
from utils.runtime import (  # noqa: E402
    ArgumentParser, LessonError, check_steps, in_batches, load_checkpoint, make_out_dir, non_negative_float,
    pick_device, positive_int, run, saved_timesteps, writable_dir,
)

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)  # SDEdit's sweep: faithful to the input at 0.2, a new image at 1.0
TRANSLATE_WEIGHTS = (0.0, 2.0, 4.0)  # rows of translate.png: the guidance weight w of lesson 03
STROKES = 4  # random strokes in the "strokes" mask
DEFAULT_STEPS = 50  # DDIM steps over the whole schedule, as lesson 04's default
SHOWN = 4  # results per setting in each figure (different noises)
MEASURE_BATCH = 100  # images per batch for --measure (docs/edit_images.md "Edit real images with a trained model": its tables)


lesson03 = load_lesson("03_conditional_ddpm.py")
lesson04 = load_lesson("04_ddim_fast_sampling.py")


# --- the edits: each takes a denoiser(x_t, t, alpha_bar_t) -> (eps_pred, x0_pred), as lesson 04's samplers use ---

def start_timestep(strength, timesteps):
    """SDEdit's t0 = strength x T as a 0-based timestep: strength 1 is the last one, T - 1."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    return max(0, round(strength * timesteps) - 1)


def ddim_from(denoiser, alpha_bars, x_t, t_start, steps, eta, generator, keep_pixels=None):
    """DDIM (lesson 04's Eq. 12 step) from x_t [N, C, H, W] at timestep t_start down to the clean image, in `steps`
    steps (at most t_start + 1) spaced "trailing" over 0 .. t_start. keep_pixels(x_prev, t_prev) may overwrite
    part of each new x_prev (inpainting) and returns it. -> images in [-1, 1]."""
    alpha_bars_list = alpha_bars.tolist()
    pairs = lesson04.timestep_pairs(min(steps, t_start + 1), "trailing", alpha_bars[:t_start + 1])
    for t, t_prev in pairs:
        alpha_bar_t, alpha_bar_prev = alpha_bars_list[t], alpha_bars_list[t_prev] if t_prev >= 0 else 1.0
        eps_pred, x0_pred = denoiser(x_t, t, alpha_bar_t)
        x_t = lesson04.ddim_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev, eta, generator)
        if keep_pixels is not None:
            x_t = keep_pixels(x_t, t, t_prev)
    return x_t.clamp(-1, 1)


@torch.inference_mode()
def sdedit(denoiser, alpha_bars, x0, strength, steps, eta, noise, generator=None):
    """SDEdit (Meng et al. 2022, with DDIM as the solver): the input x0 [N, C, H, W] noised to
    t0 = strength x T with `noise` [N, C, H, W], then denoised in about strength x `steps` steps."""
    t0 = start_timestep(strength, len(alpha_bars))
    x_t0 = visualize.noised(x0, alpha_bars[t0].item(), noise)
    return ddim_from(denoiser, alpha_bars, x_t0, t0, max(1, round(strength * steps)), eta, generator)


@torch.inference_mode()
def inpaint(denoiser, alpha_bars, x0, hole, steps, eta, noise, generator, resample=1):
    """RePaint (Lugmayr et al. 2022, Algorithm 1): images [N, C, H, W] that keep x0's pixels where `hole`
    [N or 1, 1, H, W] is False and fill those where it is True. From noise [N, C, H, W] at t = T - 1, each step
    samples the hole with DDIM and sets the known pixels to x0 noised to the new step; with resample = R > 1
    each step is taken R times, going back up one step in between with q(x_t | x_t_prev) (jumps of one step)."""
    alpha_bars_list = alpha_bars.tolist()

    def keep_pixels(x_prev, t, t_prev):
        alpha_bar_prev = alpha_bars_list[t_prev] if t_prev >= 0 else 1.0
        known = visualize.noised(x0, alpha_bar_prev, torch.randn(x0.shape, device=x0.device, generator=generator))
        return torch.where(hole, x_prev, known)  # at the clean image (t_prev = -1) known is x0 itself

    def step_with_resampling(x_prev, t, t_prev):
        x_prev = keep_pixels(x_prev, t, t_prev)
        alpha_bar_t, alpha_bar_prev = alpha_bars_list[t], alpha_bars_list[t_prev] if t_prev >= 0 else 1.0
        for _ in range(resample - 1):
            # Back up to t: q(x_t | x_t_prev) = N(sqrt(alpha_bar_t / alpha_bar_prev) x_t_prev, (1 - that) I)
            # (DDPM Eq. 2 over the gap), then take the step again from there.
            ratio = alpha_bar_t / alpha_bar_prev
            x_t = math.sqrt(ratio) * x_prev + math.sqrt(1 - ratio) * torch.randn(
                x_prev.shape, device=x_prev.device, generator=generator)
            eps_pred, x0_pred = denoiser(x_t, t, alpha_bar_t)
            x_prev = keep_pixels(lesson04.ddim_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev, eta,
                                                    generator), t, t_prev)
        return x_prev

    x_start = torch.where(hole, noise, visualize.noised(x0, alpha_bars_list[-1], noise))
    return ddim_from(denoiser, alpha_bars, x_start, len(alpha_bars) - 1, steps, eta, generator, step_with_resampling)


# --- the models: a checkpoint as a denoiser ---

def guided_denoiser(model, labels, w):
    """A lesson 03 network as a denoiser of the classes labels [N] (or [1], for every image) at guidance weight w:
    lesson 03's guided prediction (Ho & Salimans Eq. 6), and x0 from it as lesson 03's sampler makes it."""
    def denoiser(x_t, t, alpha_bar_t):
        timesteps = torch.full((x_t.shape[0],), t, device=x_t.device)
        eps_pred = lesson03.guided_eps(model, x_t, timesteps, labels.expand(x_t.shape[0]), w)
        # DDPM Eq. 4 solved for x_0, clipped like lesson 03's sampler, and eps made consistent with it.
        x0_pred = ((x_t - math.sqrt(1 - alpha_bar_t) * eps_pred) / math.sqrt(alpha_bar_t)).clamp(-1, 1)
        return (x_t - math.sqrt(alpha_bar_t) * x0_pred) / math.sqrt(1 - alpha_bar_t), x0_pred
    return denoiser


def load_denoiser(path, device):
    """A lesson 02, 03 or 04 checkpoint -> (make_denoiser(labels, w), alpha_bars [T], config). For lesson 03,
    labels [N] and w choose the guided prediction (Ho & Salimans Eq. 6), and labels None the unconditional
    model (its null class); the others ignore them."""
    checkpoint = load_checkpoint(path, ("02_ddpm", "03_conditional_ddpm", "04_ddim_fast_sampling", "05_latent_diffusion"))
    config = checkpoint["config"]
    if checkpoint["lesson"] == "05_latent_diffusion":
        raise LessonError(f"{path} is a lesson 05 checkpoint: these edits work on lesson 02, 03 or 04 checkpoints "
                          f"(pixels), not yet on latents")
    if checkpoint["lesson"] == "03_conditional_ddpm":
        model = lesson03.build_model(config)
        model.load_state_dict(lesson03.with_current_names(checkpoint)["ema"])
        model = model.to(device).eval()
        alpha_bars = lesson03.make_schedule(device, saved_timesteps(config, None, path))["alpha_bars"]

        unconditional = torch.tensor([model.null_class], device=device)  # sdedit and inpaint: no class asked for

        def make_denoiser(labels, w):
            return guided_denoiser(model, unconditional, 0.0) if labels is None else guided_denoiser(model, labels, w)
        return make_denoiser, alpha_bars, {**config, "lesson": "03_conditional_ddpm"}
    model, config = lesson04.load_model(path, device)
    config["timesteps"] = saved_timesteps(config, None, path)
    alpha_bars = lesson04.make_schedule(config["schedule"], device, config["timesteps"])["alpha_bars"]
    prediction = config.get("prediction", "eps")

    def make_denoiser(labels=None, w=None):
        return lambda x_t, t, alpha_bar_t: lesson04.predict_eps_and_x0(
            model, x_t, t, alpha_bar_t, prediction, lesson04.clip_for(prediction))
    return make_denoiser, alpha_bars, {**config, "lesson": checkpoint["lesson"]}


# --- inputs ---

def load_inputs(args, config, count):
    """The image to edit, repeated `count` times [count, C, H, W], and a label for the figures."""
    size, channels = config["image_size"], config["channels"]
    if args.input is not None:
        image = data.read_image(args.input, size, channels)
        return image[None].expand(count, -1, -1, -1).clone(), Path(args.input).name
    if config["dataset"] == data.FOLDER_DATASET:
        dataset = data.load_image_folder(config["image_folder"], size, channels, args.data_dir)
    else:
        try:
            dataset = data.load_dataset(config["dataset"], args.data_dir, "test", download=False)
        except data.DataUnavailable:
            dataset = data.load_dataset(config["dataset"], args.data_dir, "train", download=False)
    if args.test_index >= len(dataset.images):
        raise LessonError(f"--test-index must be below {len(dataset.images)}, the number of images, got "
                          f"{args.test_index}")
    return dataset.images[args.test_index][None].expand(count, -1, -1, -1).clone(), f"image {args.test_index}"


def make_hole(kind, size, count, generator):
    """The pixels to fill, True in a boolean [count, 1, size, size]: a centre box of half the side, the left
    half, or STROKES random thick strokes (one draw per image)."""
    hole = torch.zeros(count, 1, size, size, dtype=torch.bool)
    if kind == "box":
        hole[..., size // 4:size - size // 4, size // 4:size - size // 4] = True
    elif kind == "left":
        hole[..., :size // 2] = True
    else:
        width = max(1, size // 10)
        for image in hole:
            for _ in range(STROKES):
                y0, x0, y1, x1 = (torch.randint(0, size, (4,), generator=generator)).tolist()
                for k in range(4 * size):  # a line of dots from (y0, x0) to (y1, x1), each width x width
                    y, x = y0 + (y1 - y0) * k // (4 * size), x0 + (x1 - x0) * k // (4 * size)
                    image[:, y:y + width, x:x + width] = True
    return hole


def load_hole(args, size, count, generator):
    """--mask-image (white: fill, black: keep, as in diffusers' inpainting) or the --mask shape."""
    if args.mask_image is None:
        return make_hole(args.mask, size, count, generator)
    path = Path(args.mask_image).expanduser()
    from PIL import Image

    if path.is_file():
        try:
            with Image.open(path) as opened:
                mask_size = opened.size
        except OSError:
            mask_size = None
        if mask_size is not None and mask_size != (size, size):
            raise LessonError(f"--mask-image is {mask_size[0]}x{mask_size[1]}; the model makes {size}x{size} images")
    return (data.read_image(path, size, 1) > 0)[None].expand(count, -1, -1, -1)


# --- the command line ---

def strengths(text):
    """argparse type: '0.2,0.6,1' -> (0.2, 0.6, 1.0), each in (0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(value) and 0 < value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"every strength must lie in (0, 1] (t0 = strength x T), got {text!r}")
    return values


def parse_args(argv=None):
    parser = ArgumentParser(prog="python examples/edit_images.py", description=__doc__.splitlines()[0])
    edits = parser.add_subparsers(dest="edit", required=True)
    for name, text in (("sdedit", "noise the image part-way, then denoise it (SDEdit)"),
                       ("inpaint", "fill a hole in the image (RePaint)"),
                       ("translate", "SDEdit guided towards another class (a lesson 03 checkpoint)")):
        command = edits.add_parser(name, help=text, description=text, formatter_class=parser.formatter_class)
        command.error = parser.error
        command.add_argument("--checkpoint", required=True, help="a lesson 02, 03 or 04 checkpoint")
        source = command.add_mutually_exclusive_group()
        source.add_argument("--input", default=None, help="an image file, resized to the model's size and channels")
        source.add_argument("--test-index", type=int, default=0, help="else this image of the checkpoint's dataset")
        command.add_argument("--steps", type=positive_int, default=None,
                             help=f"DDIM steps over the whole schedule (an edit from t0 takes about strength x these); "
                                  f"at most the checkpoint's T; default {DEFAULT_STEPS}, or T if smaller")
        command.add_argument("--eta", type=non_negative_float, default=0.0 if name == "sdedit" else 1.0,
                             help="DDIM's eta in [0, 1] (lesson 04); RePaint samples with DDPM's noise, eta = 1, and "
                                  "lesson 03's eps-prediction checkpoints draw cleaner images with it")
        command.add_argument("--count", type=positive_int, default=SHOWN, help="results per setting (noises)")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--data-dir", default="data", help="where the checkpoint's dataset is (--test-index)")
        command.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
        command.add_argument("--out", type=writable_dir, default=Path("outputs/edit_images"), help="output folder")
        if name in ("sdedit", "translate"):
            command.add_argument("--strength", type=strengths, default=STRENGTHS if name == "sdedit" else (0.5, 0.7, 0.9),
                                 help="t0 / T for each column: 0 keeps the input, 1 is pure sampling")
        if name in ("sdedit", "translate"):
            command.add_argument("--measure", type=positive_int, default=None,
                                 help="also edit this many test images at each setting and score them with utils.metrics "
                                      "(sdedit: distance to the input and FD; translate: how many the classifier "
                                      "calls the target class)")
        if name == "inpaint":
            command.add_argument("--mask", choices=["box", "left", "strokes"], default="box",
                                 help="which pixels to fill")
            command.add_argument("--mask-image", default=None,
                                 help="instead: a mask picture of the model's size, white where to fill")
            command.add_argument("--resample", type=positive_int, default=5,
                                 help="RePaint's r: each step taken this many times (1: the simple baseline)")
        if name == "translate":
            command.add_argument("--class-label", type=int, required=True,
                                 help="the class number to translate towards (0-based, in the order of the dataset's "
                                      "classes, or of a folder's sorted subfolder names)")
            command.add_argument("--guidance-weight", type=non_negative_float, default=None,
                                 help=f"one guidance weight w (default: the rows {TRANSLATE_WEIGHTS})")
    args = parser.parse_args(argv)
    if args.eta > 1:
        parser.error(f"--eta must be at most 1, got {args.eta:g} (DDIM Eq. 16)")
    if args.test_index < 0:
        parser.error(f"--test-index cannot be negative, got {args.test_index}")
    return args


def write_sdedit(make_denoiser, alpha_bars, config, args, device):
    inputs, name = load_inputs(args, config, args.count)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(inputs.shape, generator=generator).to(device)
    denoiser, columns = make_denoiser(None, None), []
    for strength in args.strength:
        started = time.perf_counter()
        columns.append(sdedit(denoiser, alpha_bars, inputs.to(device), strength, args.steps, args.eta, noise))
        print(f"SDEdit at strength {strength:g}: {args.count} images in {time.perf_counter() - started:.1f} s")
    grid = torch.stack([inputs.cpu(), *[column.cpu() for column in columns]], dim=1)  # [count, 1 + S, C, H, W]
    paths = [visualize.save_labeled_grid(grid.flatten(0, 1), [f"noise {i + 1}" for i in range(args.count)],
                                         [name, *[f"strength {s:g}" for s in args.strength]],
                                         args.out / "sdedit.png", column_title="input, then SDEdit")]
    if args.measure:
        paths.append(measure_sdedit(denoiser, alpha_bars, config, args, device))
    return paths


def edit_in_batches(denoiser, alpha_bars, inputs, noise, strength, args, device):
    """SDEdit of many inputs [N, C, H, W] with their noises, MEASURE_BATCH at a time -> [N, C, H, W] on the CPU."""
    return in_batches(len(inputs), MEASURE_BATCH, lambda start, count: (sdedit(
        denoiser, alpha_bars, inputs[start:start + count].to(device), strength, args.steps, args.eta,
        noise[start:start + count].to(device)), None))[0]


def measure_sdedit(denoiser, alpha_bars, config, args, device):
    """SDEdit on the first --measure test images at each strength: their RMS distance to the inputs (pixels in
    [-1, 1]) and utils.metrics' FD minus the floor. -> sdedit.csv."""
    if config["dataset"] not in data.DATASETS:
        raise LessonError("--measure scores with utils.metrics, which knows only the built-in datasets")
    dataset = data.load_dataset(config["dataset"], args.data_dir, "test", download=False)
    inputs = dataset.images[:args.measure]
    noise = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    rows = []
    for strength in args.strength:
        started = time.perf_counter()
        edited = edit_in_batches(denoiser, alpha_bars, inputs, noise, strength, args, device)
        scores = metrics.evaluate(edited, config["dataset"], data_dir=args.data_dir, device=device)
        rows.append({"strength": strength, "images": len(inputs),
                     "rms_distance_to_input": round((edited - inputs).square().mean().sqrt().item(), 4),
                     "fd": scores["fd"], "fd_real_floor": scores["fd_real_floor"],
                     "fd_above_floor": round(scores["fd"] - scores["fd_real_floor"], 2),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(", ".join(f"{key} {value}" for key, value in rows[-1].items()))
    path = args.out / "sdedit.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_inpaint(make_denoiser, alpha_bars, config, args, device):
    inputs, name = load_inputs(args, config, args.count)
    generator = torch.Generator().manual_seed(args.seed)
    hole = load_hole(args, config["image_size"], args.count, generator)
    noise = torch.randn(inputs.shape, generator=generator).to(device)
    denoiser, results = make_denoiser(None, None), []
    runs = [("no resampling", 1)] + ([(f"resampling r = {args.resample}", args.resample)] if args.resample > 1 else [])
    for label, resample in runs:
        started = time.perf_counter()
        sampler_generator = torch.Generator(device=device).manual_seed(args.seed)
        results.append(inpaint(denoiser, alpha_bars, inputs.to(device), hole.to(device), args.steps, args.eta, noise,
                               sampler_generator, resample).cpu())
        print(f"inpainting, {label}: {args.count} images in {time.perf_counter() - started:.1f} s")
    shown_hole = torch.where(hole, torch.zeros_like(inputs), inputs)  # the kept pixels, the hole grey
    grid = torch.stack([inputs, shown_hole, *results], dim=1)
    return [visualize.save_labeled_grid(grid.flatten(0, 1), [f"noise {i + 1}" for i in range(args.count)],
                                        [name, "kept pixels", *[label for label, _ in runs]],
                                        args.out / "inpaint.png", column_title="input, mask, results")]


def write_translate(make_denoiser, alpha_bars, config, args, device):
    if config["lesson"] != "03_conditional_ddpm":
        raise LessonError(f"translate needs a lesson 03 checkpoint (class-conditional); {args.checkpoint} is "
                          f"{config['lesson']}'s")
    names = config.get("classes") or data.DATASETS[config["dataset"]].classes
    if not 0 <= args.class_label < config["num_classes"]:
        raise LessonError(f"--class-label must be between 0 and {config['num_classes'] - 1}, got {args.class_label}")
    inputs, name = load_inputs(args, config, 1)
    weights = TRANSLATE_WEIGHTS if args.guidance_weight is None else (args.guidance_weight,)
    noise = torch.randn((len(weights) * len(args.strength), *inputs.shape[1:]),
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    labels = torch.full((1,), args.class_label, device=device)
    rows, started = [], time.perf_counter()
    for i, w in enumerate(weights):
        denoiser = make_denoiser(labels, w)
        rows.append(torch.cat([inputs] + [sdedit(denoiser, alpha_bars, inputs.to(device), strength, args.steps,
                                                 args.eta, noise[[i * len(args.strength) + j]]).cpu()
                                          for j, strength in enumerate(args.strength)]))
    print(f"translated towards {names[args.class_label]!r}: {len(weights) * len(args.strength)} images in "
          f"{time.perf_counter() - started:.1f} s")
    paths = [visualize.save_labeled_grid(torch.cat(rows), [f"w = {w:g}" for w in weights],
                                         [name, *[f"strength {s:g}" for s in args.strength]],
                                         args.out / "translate.png", row_title=f"towards {names[args.class_label]}",
                                         column_title="input, then strength")]
    if args.measure:
        paths.append(measure_translate(make_denoiser, alpha_bars, config, args, device, weights))
    return paths


def measure_translate(make_denoiser, alpha_bars, config, args, device, weights):
    """Translate the first --measure test images of other classes at each (w, strength), and count how many
    utils.metrics' classifier assigns to the target class. -> translate.csv."""
    if config["dataset"] not in data.DATASETS:
        raise LessonError("--measure classifies with utils.metrics, which knows only the built-in datasets")
    dataset = data.load_dataset(config["dataset"], args.data_dir, "test", download=False)
    inputs = dataset.images[dataset.labels != args.class_label][:args.measure]
    classifier, _ = metrics.load_classifier(config["dataset"], args.data_dir, device=device)
    noise = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    labels = torch.full((1,), args.class_label, device=device)
    rows = [{"guidance_weight": "input", "strength": 0, "images": len(inputs),
             "share_of_target_class": round((metrics.predict(classifier, inputs, device)[1] == args.class_label)
                                            .float().mean().item(), 4)}]
    for w in weights:
        for strength in args.strength:
            started = time.perf_counter()
            edited = edit_in_batches(make_denoiser(labels, w), alpha_bars, inputs, noise, strength, args, device)
            predicted = metrics.predict(classifier, edited, device)[1]
            rows.append({"guidance_weight": w, "strength": strength, "images": len(inputs),
                         "share_of_target_class": round((predicted == args.class_label).float().mean().item(), 4),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(", ".join(f"{key} {value}" for key, value in rows[-1].items()))
    path = args.out / "translate.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["guidance_weight", "strength", "images", "share_of_target_class",
                                                  "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    make_denoiser, alpha_bars, config = load_denoiser(args.checkpoint, device)
    check_steps(args.steps, len(alpha_bars), args.checkpoint)  # the sampler would take only T of them
    args.steps = args.steps or min(DEFAULT_STEPS, len(alpha_bars))
    make_out_dir(args.out)
    writer = {"sdedit": write_sdedit, "inpaint": write_inpaint, "translate": write_translate}[args.edit]
    for path in writer(make_denoiser, alpha_bars, config, args, device):
        print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
