"""Pictures of diffusion: the forward and reverse processes, noise schedules, sample grids, GIFs, loss curves.

Lessons call these helpers to draw what they computed. Each figure can also be made from the command line,
with no training and no lesson code:

    python -m utils.visualize forward --dataset mnist       # q(x_t | x_0) on a few training images
    python -m utils.visualize reverse --dataset mnist       # x_t and the predicted x_0 along the reverse process
    python -m utils.visualize schedules                     # betas, alpha_bar and log-SNR: linear vs cosine
    python -m utils.visualize loss outputs/01_ddpm_toy/metrics.csv outputs/02_ddpm/metrics.csv
    python -m utils.visualize samples outputs/*/samples.npz  # runs side by side, one row of samples each

Each writes a PNG (reverse also a GIF) under --out (default outputs/figures) and prints its path.
"""
import argparse
import csv
import math
import zipfile
from pathlib import Path

import imageio.v2 as imageio
import matplotlib

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.utils import make_grid

from utils import data
from utils.runtime import ArgumentParser, LessonError, atomic_output, make_out_dir, positive_int, run, writable_dir

DISPLAY_SCALE = 2  # 28-pixel images are tiny on a screen; upscale by pixel repetition
GIF_MS_PER_FRAME = 80
GIF_FINAL_HOLD_MS = 1500  # show the finished samples for a while before the loop restarts
SAMPLES_GRID_LIMIT = 64  # samples.png shows at most this many (8 x 8 at 28 pixels is readable; 1000 is not)


def to_uint8(images):
    """[-1, 1] float images N x C x H x W -> uint8 numpy N x H x W x C."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_image(images, nrow=None, scale=DISPLAY_SCALE):
    """[-1, 1] images N x C x H x W -> one uint8 H' x W' x 3 picture, `nrow` images per row."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=1.0)
    picture = to_uint8(grid[None])[0]
    return picture.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(images, path, nrow=None):
    """Save [-1, 1] images N x C x H x W as one PNG grid."""
    with atomic_output(path) as temporary:
        imageio.imwrite(temporary, grid_image(images, nrow))
    return Path(path)


def save_samples_grid(images, path, labels=None, limit=SAMPLES_GRID_LIMIT):
    """samples.png: [-1, 1] images N x C x H x W as one grid of at most `limit` of them, whatever N is (1000
    images in one grid are too small to see; samples.npz keeps them all). Unlabelled, or all of one class: the
    first `limit`, in rows of about sqrt(shown). With `labels` [N] of several classes: one row per class (in
    class order, at most `limit` classes), each row that class's first max(1, limit // classes) samples, a short
    row padded with white. Prints one line when it shows fewer than N. Returns the path."""
    images = images.detach().cpu()
    labels = None if labels is None else torch.as_tensor(labels).cpu()
    if labels is None or labels.unique().numel() == 1:
        shown, nrow = images[:limit], None
        if labels is not None and len(shown) <= 10:  # a few samples of one class: one row, as before
            nrow = len(shown)
    else:
        classes = labels.unique()[:limit]
        per_class = min(max(1, limit // len(classes)), max(int((labels == c).sum()) for c in classes))
        blank = torch.ones_like(images[:1])
        rows = []
        for c in classes:
            mine = images[labels == c][:per_class]
            rows.append(torch.cat([mine, blank.expand(per_class - len(mine), *images.shape[1:])]))
        shown, nrow = torch.cat(rows), per_class
    if len(shown) < len(images):
        print(f"{Path(path).name} shows {len(shown)} of the {len(images)} samples; all are in samples.npz")
    return save_grid(shown, path, nrow=nrow)


def save_samples_npz(images, path, labels=None, captions=None):
    """Save samples as uint8 N x H x W x C under key `images` (and `labels`, or `captions` as strings, when given)."""
    arrays = {"images": to_uint8(images)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels, dtype=np.int64)
    if captions is not None:
        arrays["captions"] = np.asarray(captions, dtype=str)
    with atomic_output(path) as temporary:
        np.savez_compressed(temporary, **arrays)
    return Path(path)


def read_samples_npz(path, limit=None):
    """What save_samples_npz wrote: (images uint8 [N, H, W, C], labels int64 [N] or None), the first `limit` of
    each when given. Raises LessonError (one line, naming the file) for one that is not a lesson's samples.npz:
    cut short (not a whole zip), noise, another kind of file, or without the key `images`; and for a `limit` above
    the images the file holds (a count the user chose is never silently cut, issue 38)."""
    try:
        with np.load(path) as arrays:
            images = arrays["images"]
            labels = arrays["labels"] if "labels" in arrays else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # (a cut .npz: BadZipFile)
        raise LessonError(f"{path} is not a lesson's samples.npz ({error})") from None
    if limit is not None and limit > len(images):
        raise LessonError(f"--limit {limit} is more than the {len(images)} images in {path}")
    return images[:limit], None if labels is None else labels[:limit]


def save_captioned_rows(rows, captions, path, scale=DISPLAY_SCALE):
    """rows [R, N, C, H, W] in [-1, 1]: one row of N pictures per caption, the caption printed above its row."""
    count, per_row = rows.shape[:2]
    figure, axes = plt.subplots(count, 1, figsize=(max(4.0, per_row * rows.shape[-1] * scale / 100 + 0.4),
                                                   count * (rows.shape[-2] * scale / 100 + 0.45)), squeeze=False)
    for axis, row, text in zip(axes[:, 0], rows, captions):
        axis.imshow(grid_image(row, nrow=per_row, scale=scale))
        axis.set_title(text, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
    return Path(path)


def save_attention_maps(image, maps, words, path):
    """A picture [C, H, W] in [-1, 1] and one attention map per word [len(words), H, W] (any scale): the picture,
    then each word's map over it, titled with the word (Prompt-to-Prompt's figure of cross-attention). With no
    words (the empty prompt) the picture alone, titled so."""
    picture = to_uint8(image[None])[0]
    figure, axes = plt.subplots(1, len(words) + 1, figsize=(1.9 * (len(words) + 1), 1.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
    axes[0].set_title("picture" if words else "picture (empty prompt)", fontsize=8)
    for axis, word, heat in zip(axes[1:], words, maps.detach().float().cpu()):
        axis.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
        axis.imshow(heat.numpy(), cmap="inferno", alpha=0.6)
        axis.set_title(word, fontsize=8)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
    return Path(path)


def save_denoising_gif(frames, path, nrow=None):
    """frames: list of N x C x H x W tensors from noise to image; one grid per GIF frame."""
    pictures = [grid_image(frame, nrow) for frame in frames]
    durations = [GIF_MS_PER_FRAME] * (len(pictures) - 1) + [GIF_FINAL_HOLD_MS]  # Pillow reads milliseconds
    with atomic_output(path) as temporary:
        imageio.mimsave(temporary, pictures, duration=durations, loop=0)
    return Path(path)


def save_denoising_strip(frames, steps, path, rows=4,
                         column_title="timestep t (noise at the left, sample at the right)"):
    """A PNG with one row per image and one column per recorded step (noise on the left)."""
    chosen = torch.stack([frame[:rows] for frame in frames], dim=1)  # rows x steps x C x H x W
    picture = grid_image(chosen.flatten(0, 1), nrow=len(frames))
    return _save_with_labels(picture, path, (max(6, len(frames) * 0.6), rows * 0.7 + 0.8),
                             [str(step) for step in steps], [None] * rows,
                             column_title=column_title)


def save_labeled_grid(images, row_labels, column_labels, path, row_title="", column_title=""):
    """A PNG grid of [-1, 1] images (rows x columns, row-major) with a label beside each row and column."""
    columns = len(column_labels)
    if len(images) != len(row_labels) * columns:
        raise ValueError(f"{len(images)} images do not fill {len(row_labels)} rows of {columns} columns")
    picture = grid_image(images, nrow=columns)
    return _save_with_labels(picture, path, (max(6, columns * 0.75), len(row_labels) * 0.75 + 1.2),
                             list(column_labels), list(row_labels), column_title, row_title, on_top=True)


def _save_with_labels(picture, path, figsize, column_labels, row_labels, column_title="", row_title="",
                      on_top=False):
    """Write a grid picture with a tick label centred on each column and row (row labels None: no ticks)."""
    figure, axis = plt.subplots(figsize=figsize)
    axis.imshow(picture)
    cell_width, cell_height = picture.shape[1] / len(column_labels), picture.shape[0] / len(row_labels)
    axis.set_xticks([cell_width * (index + 0.5) for index in range(len(column_labels))], column_labels, fontsize=7,
                    rotation=30 if on_top else 0)
    if any(label is not None for label in row_labels):
        axis.set_yticks([cell_height * (index + 0.5) for index in range(len(row_labels))], row_labels, fontsize=8)
    else:
        axis.set_yticks([])
    axis.set_xlabel(column_title)
    axis.set_ylabel(row_title)
    if on_top:
        axis.xaxis.set_label_position("top")
        axis.xaxis.tick_top()
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
    return Path(path)


def save_curve(xs, ys, path, xlabel, ylabel, log_x=False, log_y=False, marker=None):
    """A PNG of one line, ys against xs."""
    return save_curves([(xs, ys, None)], path, xlabel, ylabel, log_x, log_y, marker)


def save_curves(lines, path, xlabel, ylabel, log_x=False, log_y=False, marker=None):
    """A PNG of several lines on one plot: `lines` holds (xs, ys, label); a legend when any is labelled."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for xs, ys, label in lines:
        axis.plot(xs, ys, marker=marker, label=label)
    if log_x:
        xs = lines[0][0]
        axis.set_xscale("log")
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.minorticks_off()
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    if any(label for _, _, label in lines):
        axis.legend()
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
    return Path(path)


def read_loss(metrics_csv):
    """(steps, losses) from a lesson's metrics.csv. Raises LessonError (one line, naming the file) when it is
    missing, is not one (no step and loss columns, not text), or has a row cut short."""
    try:
        with open(metrics_csv, newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
        for number, row in enumerate(rows, start=2):
            if None in row.values() or None in row:  # fewer (or more) fields than the header names
                raise LessonError(f"{metrics_csv} line {number} does not have the header's {len(reader.fieldnames)} "
                                  f"fields: the file is cut short or damaged")
        return [int(row["step"]) for row in rows], [float(row["loss"]) for row in rows]
    except FileNotFoundError:
        raise LessonError(f"no metrics file at {metrics_csv}") from None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error):
        raise LessonError(f"{metrics_csv} is not a lesson's metrics.csv (columns step, loss, ...)") from None


def save_loss_curve(metrics_csv, path, ylabel="loss (MSE of predicted noise)"):
    """Plot the loss column of a metrics.csv against the step column (log scale)."""
    steps, losses = read_loss(metrics_csv)
    return save_curve(steps, losses, path, "training step", ylabel, log_y=True)


def curve_labels(paths):
    """A legend label per file: its folder (the run's name), or folder/file when two share a folder."""
    labels = [Path(name).parent.name or str(name) for name in paths]
    if len(set(labels)) < len(labels):
        labels = [str(Path(Path(name).parent.name) / Path(name).name) for name in paths]
    return labels


def save_loss_curves(metrics_csvs, path, labels=None, ylabel="training loss"):
    """Several runs' losses on one log-scale plot, one line each (labelled by curve_labels by default)."""
    labels = labels or curve_labels(metrics_csvs)
    lines = [(*read_loss(name), label) for name, label in zip(metrics_csvs, labels)]
    return save_curves(lines, path, "training step", ylabel, log_y=True)


# --- the forward and reverse processes ---

def strip_steps(T):
    """The timesteps a denoising strip shows for a T-step sampler, from noise to image: 999, 800, 600, 400, 300,
    200, 100, 50, 0 at T = 1000, the same fractions of T otherwise (repeats dropped at small T)."""
    steps = [T - 1] + [min(T - 1, round(fraction * T)) for fraction in (0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0)]
    return [step for index, step in enumerate(steps) if step not in steps[:index]]


def gif_steps(T, frames):
    """About `frames` timesteps, evenly spaced from T - 1 down to 0, for a denoising GIF of a T-step sampler."""
    return sorted(set(range(T - 1, -1, -math.ceil(T / frames))) | {0}, reverse=True)


def forward_steps(T, count=10):
    """Timesteps 0, T/count, 2T/count, ..., T-1 (0-based): where the forward-process figure looks."""
    return [round(index * T / count) for index in range(count)] + [T - 1]


def save_forward_process(frames, steps, path):
    """frames[k]: images N x C x H x W noised to timestep steps[k]; one row per image, clean at the left."""
    return save_denoising_strip(frames, steps, path, rows=len(frames[0]),
                                column_title="timestep t of q(x_t | x_0): the clean image at the left, noise at the right")


def save_reverse_process(xs, x0_preds, steps, path, rows=3):
    """The reverse process for `rows` images: x_t (upper row) and the model's x0 prediction at that step
    (lower row) for each timestep in `steps`; xs and x0_preds are lists of N x C x H x W tensors."""
    pairs = []
    for index in range(rows):
        pairs += [torch.stack([x[index] for x in xs]), torch.stack([x0[index] for x0 in x0_preds])]
    labels = [label for index in range(rows) for label in (f"x_t #{index + 1}", f"predicted x_0 #{index + 1}")]
    return save_labeled_grid(torch.cat(pairs), labels, [str(step) for step in steps], path,
                             column_title="timestep t (sampling runs from left to right)")


# --- noise schedules ---
# The figures' own copy of the two schedules (each lesson defines the one it teaches; utils never imports a
# lesson). tests/test_visualize.py checks that these agree with lessons 01 and 02.

def schedule_betas(name, T=1000):
    """beta_1 .. beta_T [T] in float64: 'linear' (DDPM Sec. 4) or 'cosine' (Improved DDPM Eq. 17)."""
    if name == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {name!r}: use 'linear' or 'cosine'")


def save_schedules(betas_by_name, path):
    """beta_t, alpha_bar_t and log-SNR = log(alpha_bar / (1 - alpha_bar)) against t, one line per schedule."""
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for name, betas in betas_by_name.items():
        betas = torch.as_tensor(betas, dtype=torch.float64)
        alpha_bars = torch.cumprod(1 - betas, dim=0)
        steps = range(len(betas))
        axes[0].plot(steps, betas, label=name)
        axes[1].plot(steps, alpha_bars, label=name)
        axes[2].plot(steps, (alpha_bars / (1 - alpha_bars)).log(), label=name)
    for axis, title in zip(axes, ["beta_t (noise added at step t)", "alpha_bar_t (signal left)",
                                  "log SNR = log(alpha_bar / (1 - alpha_bar))"]):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("timestep t")
        axis.grid(True, alpha=0.3)
        axis.legend()
    axes[0].set_yscale("log")
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
    return Path(path)


def save_sample_rows(files, labels, path, count=8, stride=1):
    """One row per samples.npz file (its images 0, stride, 2 stride, ... up to `count` of them), labelled on the
    left: runs side by side (stride 6 of lesson 03's 60 samples gives one per class). Files of
    other sizes or channels are shown at the first file's size, in colour if any is. Raises LessonError for a
    file that is not a lesson's samples.npz or holds fewer than `count` images."""
    rows = []
    for file in files:
        images, _ = read_samples_npz(file)
        if images.ndim != 4 or len(images[::stride]) < count:
            raise LessonError(f"{file} holds {len(images)} images of shape {images.shape[1:]}; need {count} of "
                              f"H x W x C every {stride}")
        rows.append(torch.from_numpy(images[::stride][:count]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    size = rows[0].shape[-1]
    channels = max(row.shape[1] for row in rows)
    rows = [torch.nn.functional.interpolate(row, size=(size, size), mode="nearest").expand(-1, channels, -1, -1)
            for row in rows]
    picture = grid_image(torch.cat(rows), nrow=count)
    return _save_with_labels(picture, path, (count * 0.75 + 1.6, len(rows) * 0.75 + 0.3), [""] * count, labels)


# --- the command line: each figure without training ---

def noised(x0, alpha_bar, eps):
    """DDPM Eq. 4: a draw of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps


def ideal_x0(x_t, alpha_bar, reference):
    """E[x_0 | x_t] when the data are exactly the `reference` images [M, C, H, W]: the best possible
    denoiser for that finite set. Bayes' rule with the Gaussian q(x_t | x_0 = x_m) of DDPM Eq. 4 gives
    weights softmax_m(-|x_t - sqrt(alpha_bar) x_m|^2 / (2 (1 - alpha_bar))) over the reference images."""
    flat, points = x_t.flatten(1), reference.flatten(1)
    # |x_t - a x_m|^2 = |x_t|^2 - 2 a x_t.x_m + a^2 |x_m|^2 with a = sqrt(alpha_bar); |x_t|^2 is the same
    # for every m, so it cancels in the softmax: one matrix product does the work.
    logits = (math.sqrt(alpha_bar) * flat @ points.T - alpha_bar / 2 * points.square().sum(1)) / (1 - alpha_bar)
    return (torch.softmax(logits, dim=1) @ points).view_as(x_t)


def ideal_reverse(reference, count, betas, generator, keep):
    """DDPM ancestral sampling (Algorithm 2 through the posterior, Eqs. 6-7) with ideal_x0 as the model.
    Returns {t: x_t} and {t: x0_pred} for t in `keep`, and the final images [count, C, H, W], all on reference's
    device and in its dtype. The noise is drawn by the CPU `generator` (the same images on every device)."""
    alpha_bars = torch.cumprod(1 - betas, dim=0).tolist()
    betas = betas.tolist()

    def noise():
        return torch.randn((count, *reference.shape[1:]), generator=generator).to(reference.device, reference.dtype)

    x_t = noise()
    xs, x0s = {}, {}
    for t in range(len(betas) - 1, -1, -1):
        alpha_bar, alpha_bar_prev = alpha_bars[t], alpha_bars[t - 1] if t > 0 else 1.0
        x0_pred = ideal_x0(x_t, alpha_bar, reference)
        if t in keep:
            xs[t], x0s[t] = x_t.clamp(-1, 1), x0_pred
        # DDPM Eq. 7: the posterior mean and variance given x_0 = x0_pred.
        mean = (math.sqrt(alpha_bar_prev) * betas[t] * x0_pred
                + math.sqrt(1 - betas[t]) * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas[t]
        x_t = mean + math.sqrt(variance) * noise() if t > 0 else mean
    return xs, x0s, x_t.clamp(-1, 1)


REFERENCE_IMAGES = 2000  # the reverse figure's ideal denoiser knows this many training images by default


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m utils.visualize",
                            description="Draw a figure of diffusion without training (forward, reverse, "
                                        "schedules), or from runs' files (loss, samples).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=writable_dir, default="outputs/figures", help="folder for the figure")
    figures = parser.add_subparsers(dest="figure", required=True, metavar="FIGURE",
                                    parser_class=ArgumentParser)
    forward = figures.add_parser("forward", parents=[common],
                                 help="training images noised by q(x_t | x_0) at t = 0, T/10, ..., T")
    reverse = figures.add_parser("reverse", parents=[common],
                                 help="x_t and the predicted x_0 along 1000 reverse steps, as PNG and GIF. The model "
                                      "is the ideal denoiser of a few thousand training images: it can only "
                                      "rebuild those images, which is why diffusion needs a network that generalises")
    for command in (forward, reverse):
        command.add_argument("--dataset", choices=list(data.DATASETS), default=None,
                             help="default mnist (Fashion-MNIST when MNIST cannot be had)")
        command.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
        command.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
        command.add_argument("--count", type=positive_int, default=4, help="images to show")
        command.add_argument("--seed", type=int, default=0, help="random seed")
    reverse.add_argument("--reference", type=positive_int, default=None,
                         help=f"training images the ideal denoiser knows (its whole 'dataset'); default "
                              f"{REFERENCE_IMAGES}, or all of a smaller dataset")
    figures.add_parser("schedules", parents=[common],
                       help="betas, alpha_bar and log-SNR of the linear and cosine schedules")
    loss = figures.add_parser("loss", parents=[common], help="training loss from one or more metrics.csv files")
    loss.add_argument("metrics", nargs="+", type=Path, help="metrics.csv files written by lessons")
    samples = figures.add_parser("samples", parents=[common],
                                 help="runs side by side: the first --count samples of each samples.npz, one row each")
    samples.add_argument("files", nargs="+", type=Path, help="samples.npz files written by lessons")
    samples.add_argument("--labels", nargs="+", help="one label per file (default: each file's folder name)")
    samples.add_argument("--count", type=positive_int, default=8, help="images per row")
    samples.add_argument("--stride", type=positive_int, default=1,
                         help="take every stride-th sample (6 shows one of each class of lesson 03's 60)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    make_out_dir(args.out)
    T = 1000
    paths = []
    if args.figure == "schedules":
        paths.append(save_schedules({name: schedule_betas(name, T) for name in ("linear", "cosine")},
                                    args.out / "schedules.png"))
    elif args.figure == "loss":
        paths.append(save_loss_curves(args.metrics, args.out / "loss.png"))
    elif args.figure == "samples":
        labels = args.labels or [file.parent.name for file in args.files]
        if len(labels) != len(args.files):
            raise LessonError(f"--labels gives {len(labels)} labels for {len(args.files)} files")
        paths.append(save_sample_rows(args.files, labels, args.out / "samples_rows.png", args.count,
                                      args.stride))
    else:
        dataset = data.load_with_fallback(args.dataset or "mnist", args.data_dir, explicit=args.dataset is not None,
                                          candidates=["mnist", "fashion-mnist"])
        available = len(dataset.images)
        for flag, asked in (("--count", args.count), ("--reference", getattr(args, "reference", None))):
            if asked is not None and asked > available:  # a value the user chose is never silently cut
                raise LessonError(f"{flag} {asked} is more than the {available} images of {dataset.name}")
        generator = torch.Generator().manual_seed(args.seed)
        betas = schedule_betas(args.schedule, T)
        if args.figure == "forward":
            pick = torch.randperm(len(dataset.images), generator=generator)[:args.count]
            x0, eps = dataset.images[pick], torch.randn((args.count, *dataset.images.shape[1:]), generator=generator)
            alpha_bars = torch.cumprod(1 - betas, dim=0).tolist()
            steps = forward_steps(T)
            frames = [noised(x0, alpha_bars[t], eps) for t in steps]  # the same eps at every t: one path
            paths.append(save_forward_process(frames, steps, args.out / f"forward_{args.schedule}.png"))
        else:
            reference = args.reference or min(REFERENCE_IMAGES, available)
            pick = torch.randperm(available, generator=generator)[:reference]
            steps = [999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 0]
            gif_steps = list(range(T - 1, -1, -25)) + [0]
            xs, x0s, _ = ideal_reverse(dataset.images[pick], args.count, betas, generator, set(steps) | set(gif_steps))
            paths.append(save_reverse_process([xs[t] for t in steps], [x0s[t] for t in steps], steps,
                                              args.out / f"reverse_{args.schedule}.png", rows=args.count))
            paths.append(save_denoising_gif([torch.cat([xs[t], x0s[t]]) for t in sorted(gif_steps, reverse=True)],
                                            args.out / f"reverse_{args.schedule}.gif", nrow=args.count))
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
