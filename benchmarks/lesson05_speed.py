"""Cost of one training step in lesson 05's latent space against one of lesson 02 in pixel space.

    python benchmarks/lesson05_speed.py                  # CPU, batch 128, 28x28x1 images, 7x7x4 latents
    python benchmarks/lesson05_speed.py --device cuda

Both run full training steps (forward, backward, clipping, AdamW, EMA) at the same batch size with
their lesson's default network: lesson 02's U-Net on 28x28 pixels, lesson 05's latent U-Net on the
7x7x4 latents its autoencoder makes of them (the latents are precomputed once, as lesson 05 does, so
the autoencoder costs nothing per step). Also one autoencoder training step, the cost of stage 1.
Interleaved repeats; read the ratios. Writes benchmarks/results/lesson05_speed_<device>.csv and .md.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

from common import load_lesson, write_results
from utils.runtime import pick_device

lesson02 = load_lesson("02_ddpm.py")
lesson05 = load_lesson("05_latent_diffusion.py")

WARMUP_STEPS = 2


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(step, steps, device):
    for _ in range(WARMUP_STEPS):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 5 CPU, 50 GPU)")
    args = parser.parse_args()
    device = pick_device(args.device)
    steps = args.steps or (5 if device.type == "cpu" else 50)
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(0)
    defaults = lesson05.parse_args([])

    pixel_model = lesson02.UNet(1, 16, (1, 2, 4), 1).to(device)  # lesson 02's default network
    pixel_parts = (pixel_model, lesson02.EMA(pixel_model, 0.999), torch.optim.AdamW(pixel_model.parameters()))
    pixels, schedule = torch.randn(args.batch, 1, 28, 28, device=device), lesson02.make_schedule("cosine", device)

    latent_model = lesson05.UNet(defaults.latent_channels, defaults.width, (1, 2), 7).to(device)
    latent_parts = (latent_model, lesson05.EMA(latent_model, 0.999), torch.optim.AdamW(latent_model.parameters()))
    latents = torch.randn(args.batch, defaults.latent_channels, 7, 7, device=device)
    alpha_bars = lesson05.make_schedule(device)["alpha_bars"]

    autoencoder = lesson05.Autoencoder(1, defaults.autoencoder_width, defaults.latent_channels).to(device)
    autoencoder_optimizer = torch.optim.Adam(autoencoder.parameters())

    def update(loss, model, ema, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model, 100)

    def pixel_step():
        update(lesson02.loss_fn(pixel_model, pixels, schedule, generator), *pixel_parts)

    def latent_step():
        update(lesson05.loss_fn(latent_model, latents, alpha_bars, generator), *latent_parts)

    def autoencoder_step():
        loss, _ = lesson05.autoencoder_loss(autoencoder, pixels, defaults.kl_weight, generator)
        autoencoder_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        autoencoder_optimizer.step()

    measures = {"pixel": [], "latent": [], "autoencoder": []}
    for _ in range(args.repeats):
        measures["pixel"].append(seconds_per_step(pixel_step, steps, device))
        measures["latent"].append(seconds_per_step(latent_step, steps, device))
        measures["autoencoder"].append(seconds_per_step(autoencoder_step, steps, device))
    pixel, latent, stage1 = (statistics.median(measures[key]) for key in ("pixel", "latent", "autoencoder"))
    count = lambda model: f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"  # noqa: E731
    rows = [
        {"measure": f"lesson 02: one training step on 28x28x1 pixels, batch {args.batch} ({count(pixel_model)})",
         "value": f"{pixel * 1000:.1f} ms", "ratio": "1.0"},
        {"measure": f"lesson 05: one training step on 7x7x{defaults.latent_channels} latents, batch {args.batch} "
                    f"({count(latent_model)})", "value": f"{latent * 1000:.1f} ms", "ratio": f"{pixel / latent:.1f}"},
        {"measure": f"lesson 05 stage 1: one autoencoder step on 28x28x1 pixels, batch {args.batch} "
                    f"({count(autoencoder)})", "value": f"{stage1 * 1000:.1f} ms", "ratio": f"{pixel / stage1:.1f}"},
    ]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    command = " ".join(["python benchmarks/lesson05_speed.py", *sys.argv[1:]])
    write_results(rows, f"lesson05_speed_{device.type}",
                  f"Measured with `{command}` on {machine}, torch {torch.__version__}: medians of {args.repeats} "
                  f"interleaved repeats of {steps} steps.", ratio_header="times cheaper than lesson 02's step")


if __name__ == "__main__":
    main()
