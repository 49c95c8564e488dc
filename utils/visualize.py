"""Pictures of a run: sample grids, the denoising process (strip and GIF) and the loss curve."""
import csv
import math
from pathlib import Path

import imageio.v2 as imageio
import matplotlib

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.utils import make_grid

DISPLAY_SCALE = 2  # 28-pixel images are tiny on a screen; upscale by pixel repetition
GIF_MS_PER_FRAME = 80
GIF_FINAL_HOLD_MS = 1500  # show the finished samples for a while before the loop restarts


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
    imageio.imwrite(path, grid_image(images, nrow))
    return Path(path)


def save_samples_npz(images, path, labels=None):
    """Save samples as uint8 N x H x W x C under key `images` (and `labels` when given)."""
    arrays = {"images": to_uint8(images)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels, dtype=np.int64)
    np.savez_compressed(path, **arrays)
    return Path(path)


def save_denoising_gif(frames, path, nrow=None):
    """frames: list of N x C x H x W tensors from noise to image; one grid per GIF frame."""
    pictures = [grid_image(frame, nrow) for frame in frames]
    durations = [GIF_MS_PER_FRAME] * (len(pictures) - 1) + [GIF_FINAL_HOLD_MS]  # Pillow reads milliseconds
    imageio.mimsave(path, pictures, duration=durations, loop=0)
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
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def save_curve(xs, ys, path, xlabel, ylabel, log_x=False, log_y=False, marker=None):
    """A PNG of one line, ys against xs."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(xs, ys, marker=marker)
    if log_x:
        axis.set_xscale("log")
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.minorticks_off()
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def save_loss_curve(metrics_csv, path, ylabel="loss (MSE of predicted noise)"):
    """Plot the loss column of a metrics.csv against the step column (log scale)."""
    with open(metrics_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    return save_curve([int(row["step"]) for row in rows], [float(row["loss"]) for row in rows], path,
                      "training step", ylabel, log_y=True)
