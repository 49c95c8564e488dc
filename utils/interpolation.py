"""Walking between samples: lerp and slerp of starting noises (or latents), rows, grids and a GIF.

A deterministic sampler (DDIM with eta = 0, lesson 04; the same in lesson 05's latent space) is a fixed
function from starting noise to image. Walking from one noise to another therefore walks from one
sample to another, and a smooth walk shows how the model has arranged its images.

How to walk matters. Gaussian noise in d dimensions lives near the sphere of radius sqrt(d): the norm
of a draw is sqrt(d) up to about +-1, and two draws are nearly orthogonal. The straight line between
two draws (lerp) cuts through the inside of that sphere: half-way, its norm is about sqrt(d / 2), a
point that standard Gaussian noise essentially never is, and the model, trained only on real noise
levels, draws washed-out images there. Spherical interpolation (slerp, Shoemake 1985; used on GAN and
diffusion noise since White 2016, "Sampling Generative Networks") turns along the sphere instead, so
every point on the way has the norm of real noise.

Lessons decode the points these functions make and call save_interpolation to draw them.
"""
from pathlib import Path

import torch

from utils import visualize


def weights(count):
    """count evenly spaced interpolation weights from 0 to 1, both ends included."""
    if count < 2:
        raise ValueError(f"an interpolation needs at least 2 points, got {count}")
    return torch.linspace(0, 1, count)  # float32: a CPU float64 tensor must not be carried to an accelerator


def working_dtype(tensor):
    """float64 for the arithmetic on the CPU; float32 on an accelerator (Apple's MPS has no float64)."""
    return torch.float64 if tensor.device.type == "cpu" else torch.float32


def lerp(a, b, w):
    """Linear interpolation (1 - w) a + w b, for each weight in w [K] -> [K, *a.shape], on a's device and in
    a's dtype (computed in working_dtype)."""
    dtype = working_dtype(a)
    w = torch.as_tensor(w, dtype=dtype, device=a.device).view(-1, *([1] * a.dim()))
    return ((1 - w) * a.to(dtype) + w * b.to(dtype)).to(a.dtype)


def slerp(a, b, w, parallel_threshold=1e-4):
    """Spherical interpolation of a and b (any shape, taken as vectors) for each weight in w [K].

    The direction turns along the great circle from a to b at constant speed (Shoemake 1985):
        u(w) = sin((1 - w) theta) / sin(theta) a_hat + sin(w theta) / sin(theta) b_hat,  cos(theta) = a_hat . b_hat,
    and the norm moves linearly from |a| to |b|, so w = 0 gives a, w = 1 gives b, and every point between two
    draws of Gaussian noise has a norm like theirs. When a and b are nearly parallel (sin(theta) below
    `parallel_threshold`) the formula divides 0 by 0; there the great circle is the straight line, so the
    directions are lerped and renormalised; opposite vectors have no unique great circle and are refused.
    Computed in working_dtype on a's device. Returns [K, *a.shape], on a's device and in a's dtype.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate between shapes {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = working_dtype(a)
    w = torch.as_tensor(w, dtype=dtype, device=a.device).view(-1, 1)
    flat_a, flat_b = a.to(dtype).flatten(), b.to(dtype).flatten()
    norm_a, norm_b = flat_a.norm(), flat_b.norm()
    if norm_a == 0 or norm_b == 0:
        raise ValueError("slerp needs two non-zero vectors (a zero vector has no direction)")
    a_hat, b_hat = flat_a / norm_a, flat_b / norm_b
    theta = torch.arccos((a_hat @ b_hat).clamp(-1, 1))
    if torch.sin(theta) < parallel_threshold:
        if a_hat @ b_hat < 0:
            raise ValueError("slerp between opposite vectors is undefined: every great circle joins them")
        direction = (1 - w) * a_hat + w * b_hat
        direction = direction / direction.norm(dim=1, keepdim=True)
    else:
        direction = (torch.sin((1 - w) * theta) * a_hat + torch.sin(w * theta) * b_hat) / torch.sin(theta)
    norms = (1 - w) * norm_a + w * norm_b
    return (norms * direction).view(-1, *a.shape).to(a.dtype)


METHODS = {"lerp": lerp, "slerp": slerp}


def row(a, b, count, method="slerp"):
    """count points from a to b [count, *a.shape] by 'slerp' or 'lerp'."""
    return METHODS[method](a, b, weights(count))


def grid(corners, size, method="slerp"):
    """A size x size grid of points between four corners (top-left, top-right, bottom-left, bottom-right):
    each row walks from the left edge to the right edge, the edges walk from top to bottom.
    Returns [size * size, *shape], row by row; the corners are exact."""
    top_left, top_right, bottom_left, bottom_right = corners
    left, right = row(top_left, bottom_left, size, method), row(top_right, bottom_right, size, method)
    return torch.cat([row(start, end, size, method) for start, end in zip(left, right)])


def save_interpolation(rows, row_labels, path, gif_path=None):
    """rows: decoded images [R, K, C, H, W] (R walks of K steps each, [-1, 1]) -> a labelled PNG, and a GIF
    whose frame k shows step k of every walk side by side, walking there and back. Returns the paths."""
    count = rows.shape[1]
    columns = [f"{w:.2f}" for w in weights(count).tolist()]
    paths = [visualize.save_labeled_grid(rows.flatten(0, 1), list(row_labels), columns, path,
                                         column_title="interpolation weight w (0: first sample, 1: second)")]
    if gif_path is not None:
        steps = list(range(count)) + list(range(count - 2, 0, -1))  # there and back: a seamless loop
        paths.append(visualize.save_denoising_gif([rows[:, k] for k in steps], gif_path, nrow=len(rows)))
    return paths


def save_grid(images, size, path):
    """images [size * size, C, H, W] from grid(...) decoded -> one PNG."""
    if len(images) != size * size:
        raise ValueError(f"{len(images)} images do not fill a {size} x {size} grid")
    return visualize.save_grid(images, Path(path), nrow=size)

