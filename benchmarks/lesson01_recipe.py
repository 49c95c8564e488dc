"""Lesson 01's training recipe, one change at a time: sample quality for the same CPU minutes.

    python benchmarks/lesson01_recipe.py --name batch128                  # the training recipe before 2026-11-30
    python benchmarks/lesson01_recipe.py --name today --batch-size 64 --steps 5616 --lr 4e-3 --min-snr 5 \
        --channels-last                                                   # the default since 2026-11-30: 6 epochs
    python benchmarks/lesson01_recipe.py --name patch --arch patch2 --width 32 --batch-size 64 --steps 7500 \
        --lr 4e-3 --min-snr 5                                             # a network on 2x2 patches
    python benchmarks/lesson01_recipe.py --name attn --arch attn7 --batch-size 64 --steps 5400 --lr 4e-3 \
        --min-snr 5 --channels-last                                       # self-attention at 7x7
    python benchmarks/lesson01_recipe.py --name ema --ema 0.998           # one change on top of batch 128
    python benchmarks/lesson01_recipe.py --name v --batch-size 64 --steps 5616 --lr 4e-3 --min-snr 5 \
        --channels-last --prediction v                                    # lesson 02's v-prediction (a question)
    python benchmarks/lesson01_recipe.py --name lognormal --batch-size 64 --steps 5616 --lr 4e-3 --min-snr 5 \
        --channels-last --timesteps lognormal                             # EDM's training noise levels
    python benchmarks/lesson01_recipe.py --name old --checkpoint outputs/01_ddpm_toy/checkpoint.pt --variance both

Trains lesson 01's TinyUNet on Fashion-MNIST with lesson 01's own pieces (make_schedule, loss_fn, learning_rate,
EpochOrder's data order) and one change at a time: batch size and steps, peak learning rate, the network (--arch)
and its memory layout (--channels-last, as lesson 01 trains on the CPU), an EMA of the weights (lesson 02's EMA:
decay min(d, (1 + n) / (10 + n)) at step n), min-SNR-gamma loss weighting (Hang et al. 2023, arXiv:2303.09556:
lesson 01's loss_fn with snr_gamma = --min-snr), EDM's lognormal training noise levels (Karras et al. 2022,
arXiv:2206.00364: --timesteps lognormal, see lognormal_timestep_probs), and two of lesson 02's pieces, to ask what
they would buy lesson 01: v-prediction (--prediction v, see v_loss) and the cosine schedule (--schedule cosine,
with v-prediction: the first step of the eps sampler divides by sqrt(alpha_T) = 0.03), then draws --samples images
with DDPM Algorithm 2 in 1000 steps with sigma_t^2 = beta_t or the posterior variance beta_tilde_t (DDPM Eq. 7),
from the same starting noises whatever the recipe, and scores them with utils.metrics (FD minus the real-data floor
at the same count). Appends one JSON line per variance to benchmarks/results/lesson01_recipe.jsonl, with the
training minutes (which are only comparable within one day: run nothing else beside it).
"""
import argparse
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import RESULTS, ROOT, load_lesson
from utils import data, visualize
from utils.runtime import EpochOrder, load_checkpoint, pick_device

lesson01 = load_lesson("01_ddpm_toy.py")
lesson02 = load_lesson("02_ddpm.py")  # its EMA, as lesson 02 teaches it
SAMPLE_SEED = 1234  # the starting noises of every variant


# --- a network tried against lesson 01's TinyUNet (--arch patch2), built from its Block ---

class Patch2UNet(nn.Module):
    """Space-to-depth first: [B, C, 28, 28] -> [B, 4C, 14, 14] by pixel_unshuffle (no pixel lost), a two-level
    U-Net of TinyUNet's Blocks at 14x14 (width channels) and 7x7 (2 width), and pixel_shuffle back to 28x28.
    At width 32 it costs about TinyUNet's width-16 multiply-adds per image: its levels have 32 channels at 14x14
    and 64 at 7x7 where TinyUNet's have 16, 32 and 64 at 28x28, 14x14 and 7x7; 378k parameters against 146k, and
    half the activations to read and write."""

    def __init__(self, channels=1, width=32):
        super().__init__()
        self.embedding_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(self.embedding_dim, self.embedding_dim), nn.SiLU(),
                                      nn.Linear(self.embedding_dim, self.embedding_dim))
        self.stem = nn.Conv2d(4 * channels, width, 3, padding=1)
        self.down1 = lesson01.Block(width, width, self.embedding_dim)
        self.down2 = lesson01.Block(width, 2 * width, self.embedding_dim)
        self.middle = lesson01.Block(2 * width, 2 * width, self.embedding_dim)
        self.up2 = lesson01.Block(4 * width, 2 * width, self.embedding_dim)
        self.up1 = lesson01.Block(3 * width, width, self.embedding_dim)
        self.head = nn.Conv2d(width, 4 * channels, 3, padding=1)

    def forward(self, x_t, t):
        embedding = self.time_mlp(lesson01.timestep_embedding(t, self.embedding_dim))
        skip1 = self.down1(self.stem(F.pixel_unshuffle(x_t, 2)), embedding)  # [B, w, 14, 14]
        skip2 = self.down2(F.avg_pool2d(skip1, 2), embedding)                # [B, 2w, 7, 7]
        h = self.middle(skip2, embedding)
        h = self.up2(torch.cat([h, skip2], dim=1), embedding)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip1], dim=1), embedding)
        return F.pixel_shuffle(self.head(h), 2)


class MiddleUNet(lesson01.TinyUNet):
    """TinyUNet with one more module at 7x7, where the whole image is 49 positions (plausibly where its shape is
    decided): "attn", lesson 02's SelfAttention (every position sees every other; about 4% more multiply-adds), or
    "block", a second Block (two more 3x3 convolutions: about 14% more multiply-adds, 78k more parameters)."""

    def __init__(self, channels=1, width=16, kind="attn"):
        super().__init__(channels, width)
        self.kind = kind
        self.extra = (lesson02.SelfAttention(4 * width) if kind == "attn"
                      else lesson01.Block(4 * width, 4 * width, self.embedding_dim))

    def forward(self, x_t, t):
        embedding = self.time_mlp(lesson01.timestep_embedding(t, self.embedding_dim))
        skip1 = self.down1(self.stem(x_t), embedding)
        skip2 = self.down2(F.avg_pool2d(skip1, 2), embedding)
        h = self.middle(F.avg_pool2d(skip2, 2), embedding)                      # [B, 4w, 7, 7]
        h = self.extra(h) if self.kind == "attn" else self.extra(h, embedding)  # the one change
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip2], dim=1), embedding)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip1], dim=1), embedding)
        return self.head(h)


ARCHITECTURES = {"tiny": lesson01.TinyUNet, "patch2": Patch2UNet,
                 "attn7": lambda channels, width: MiddleUNet(channels, width, "attn"),
                 "block7": lambda channels, width: MiddleUNet(channels, width, "block")}


def make_schedule(name):
    """Lesson 01's linear betas ("linear") or lesson 02's cosine schedule ("cosine", Improved DDPM Eq. 17), T = 1000,
    on the CPU: {"betas", "alphas", "alpha_bars", ...}, each [1000]."""
    return lesson01.make_schedule(torch.device("cpu")) if name == "linear" else lesson02.make_schedule(
        "cosine", torch.device("cpu"))


def v_loss(model, x0, schedule, generator, snr_gamma):
    """lesson01.loss_fn with the network predicting v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans &
    Ho 2022, Section 4; lesson 02's --prediction v) instead of eps, with the same draws of t and eps. The noise it
    implies is eps_pred = sqrt(alpha_bar_t) v_pred + sqrt(1 - alpha_bar_t) x_t, so that
    ||v - v_pred||^2 = (SNR_t + 1) / SNR_t * ||eps - eps_pred||^2; min-SNR-gamma's weight for v is therefore
    min(SNR_t, gamma) / (SNR_t + 1) (Hang et al. 2023), which makes this the same objective as
    lesson01.loss_fn's, reached through another output of the network. snr_gamma = 0: the plain v loss."""
    timesteps = len(schedule["betas"])
    t = torch.randint(0, timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = lesson01.add_noise(x0, t, eps, schedule)
    alpha_bar_t = schedule["alpha_bars"][t]  # [B]
    shaped = alpha_bar_t.view(-1, 1, 1, 1)
    v = shaped.sqrt() * eps - (1.0 - shaped).sqrt() * x0
    per_image = (model(x_t, t) - v).pow(2).mean(dim=(1, 2, 3))  # [B]
    if not snr_gamma:
        return per_image.mean()
    snr_t = alpha_bar_t / (1.0 - alpha_bar_t)
    return (snr_t.clamp(max=snr_gamma) / (snr_t + 1.0) * per_image).mean()


def lognormal_timestep_probs(schedule, p_mean=-1.2, p_std=1.2):
    """EDM's training distribution of noise levels (Karras et al. 2022, arXiv:2206.00364, Table 1: ln sigma ~
    N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2) carried onto DDPM's discrete timesteps: [T] probabilities,
    p(t) = the normal's mass over the bin of ln sigma_t, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (the noise
    level of x_t / sqrt(alpha_bar_t)), bins split halfway between neighbouring timesteps, the tails folded into t = 0
    and t = T - 1. Uniform t (DDPM Algorithm 1) is the lesson's; this moves the training toward sigma ~ 0.3."""
    alpha_bars = schedule["alpha_bars"].double()
    log_sigma = 0.5 * torch.log((1.0 - alpha_bars) / alpha_bars)  # [T], increasing in t
    edges = (log_sigma[1:] + log_sigma[:-1]) / 2  # [T - 1]
    cdf = torch.special.ndtr((edges - p_mean) / p_std)
    cdf = torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)])  # [T + 1]
    return (cdf[1:] - cdf[:-1]).float()


def lognormal_loss(model, x0, schedule, generator, snr_gamma, probs):
    """lesson01.loss_fn (eps-prediction, min-SNR-gamma weight unless snr_gamma is 0) on x0 [B, C, H, W] in [-1, 1],
    with t drawn from probs [T] (lognormal_timestep_probs) instead of uniformly, then eps as loss_fn draws it.
    Returns the scalar loss."""
    t = torch.multinomial(probs, x0.shape[0], replacement=True, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = lesson01.add_noise(x0, t, eps, schedule)
    per_image = (model(x_t, t) - eps).pow(2).mean(dim=(1, 2, 3))  # [B]
    if not snr_gamma:
        return per_image.mean()
    alpha_bar_t = schedule["alpha_bars"][t]
    snr_t = alpha_bar_t / (1.0 - alpha_bar_t)
    return (snr_t.clamp(max=snr_gamma) / snr_t * per_image).mean()


def train(args, images, schedule):
    """Lesson 01's training loop with the variant's changes; returns the model to sample (the EMA if any)."""
    model = ARCHITECTURES[args.arch](1, args.width)
    if args.channels_last:  # the same network, its activations stored channels-last (NHWC) for the CPU's kernels
        model = model.to(memory_format=torch.channels_last)
    ema = lesson02.EMA(model, args.ema) if args.ema else None
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    order = EpochOrder(len(images), args.batch_size, len(images) // args.batch_size, args.seed)
    probs = lognormal_timestep_probs(schedule) if args.timesteps == "lognormal" else None
    started, losses = time.perf_counter(), []
    for step in range(args.steps):
        x0 = images[order.batch(step)]
        lesson01.set_learning_rate(optimizer, lesson01.learning_rate(step, args.steps, args.lr))
        if probs is not None:
            loss = lognormal_loss(model, x0, schedule, generator, args.min_snr, probs)
        elif args.prediction == "eps":
            loss = lesson01.loss_fn(model, x0, schedule, generator, args.min_snr)  # min-SNR weighted unless 0
        else:
            loss = v_loss(model, x0, schedule, generator, args.min_snr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        losses.append(loss.item())
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step}: loss (weighted if --min-snr) {sum(losses[-500:]) / len(losses[-500:]):.4f}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    return (ema.model if ema is not None else model), (time.perf_counter() - started) / 60


@torch.inference_mode()
def draw(model, schedule, count, variance, prediction="eps"):
    """DDPM Algorithm 2 in 1000 steps with sigma_t^2 = beta_t ("beta") or beta_tilde_t ("beta_tilde"); a v-predicting
    model's output is turned into the noise it implies, eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t."""
    betas, alphas, alpha_bars = (schedule[name].tolist() for name in ("betas", "alphas", "alpha_bars"))
    generator, images = torch.Generator().manual_seed(SAMPLE_SEED), []
    for start in range(0, count, 128):
        x = torch.randn((min(128, count - start), 1, 28, 28), generator=generator)
        for t in range(len(betas) - 1, -1, -1):
            eps = model(x, torch.full((x.shape[0],), t))
            if prediction == "v":
                eps = math.sqrt(alpha_bars[t]) * eps + math.sqrt(1 - alpha_bars[t]) * x
            x = (x - betas[t] / math.sqrt(1 - alpha_bars[t]) * eps) / math.sqrt(alphas[t])
            if t > 0:
                sigma2 = betas[t] if variance == "beta" else betas[t] * (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t])
                x = x + math.sqrt(sigma2) * torch.randn(x.shape, generator=generator)
        images.append(x.clamp(-1, 1))
    return torch.cat(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the row's name; samples go to outputs/lesson01_recipe/NAME")
    parser.add_argument("--checkpoint", help="sample a lesson 01 checkpoint instead of training")
    parser.add_argument("--steps", type=int, default=2340)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default="tiny",
                        help="tiny: lesson 01's TinyUNet; patch2: Patch2UNet (2x2 patches folded into channels); "
                             "attn7, block7: TinyUNet with self-attention or a second Block at 7x7 (MiddleUNet)")
    parser.add_argument("--channels-last", action="store_true", help="train in the channels_last memory format")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay (0: none)")
    parser.add_argument("--min-snr", type=float, default=0.0, help="min-SNR gamma (0: the plain loss)")
    parser.add_argument("--prediction", choices=["eps", "v"], default="eps",
                        help="what the network predicts (v: lesson 02's v-prediction, see v_loss)")
    parser.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                        help="linear: lesson 01's betas; cosine: lesson 02's (Improved DDPM Eq. 17)")
    parser.add_argument("--timesteps", choices=["uniform", "lognormal"], default="uniform",
                        help="how training draws t: uniform (DDPM Algorithm 1) or EDM's lognormal noise levels "
                             "(lognormal_timestep_probs; eps-prediction only)")
    parser.add_argument("--variance", choices=["beta", "beta_tilde", "both"], default="beta_tilde")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    if args.timesteps == "lognormal" and args.prediction != "eps":
        parser.error("--timesteps lognormal is written for eps-prediction: drop --prediction v")
    if args.checkpoint and args.timesteps != "uniform":
        parser.error("--timesteps changes training: it does not apply to --checkpoint")
    if args.checkpoint and (args.prediction, args.schedule) != ("eps", "linear"):
        parser.error("a lesson 01 checkpoint predicts eps on the linear schedule: drop --prediction/--schedule")
    pick_device("cpu")
    torch.manual_seed(args.seed)
    out = ROOT / "outputs" / "lesson01_recipe" / args.name
    out.mkdir(parents=True, exist_ok=True)
    schedule = make_schedule(args.schedule)
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint, lesson01.LESSON)
        model = lesson01.TinyUNet(1, checkpoint["config"]["width"])
        model.load_state_dict(checkpoint["model"])
        minutes = None
    else:
        images = data.load_dataset("fashion-mnist", args.data_dir).images
        model, minutes = train(args, images, schedule)
    model.eval()
    for variance in (["beta", "beta_tilde"] if args.variance == "both" else [args.variance]):
        started = time.perf_counter()
        images = draw(model, schedule, args.samples, variance, args.prediction)
        seconds = time.perf_counter() - started
        visualize.save_grid(images[:64], out / f"samples_{variance}.png")
        path = visualize.save_samples_npz(images, out / f"samples_{variance}.npz")
        scored = subprocess.run([sys.executable, "-m", "utils.metrics", str(path), "--dataset", "fashion-mnist",
                                 "--data-dir", args.data_dir], cwd=ROOT, capture_output=True, text=True, check=True)
        metrics = json.loads(scored.stdout.strip().splitlines()[-1])
        row = {"name": args.name, "command": " ".join(["python benchmarks/lesson01_recipe.py", *sys.argv[1:]]),
               "variance": variance, "train_min": minutes and round(minutes, 2), "samples": args.samples,
               "fd": metrics["fd"], "fd_real_floor": metrics["fd_real_floor"],
               "fd_minus_floor": round(metrics["fd"] - metrics["fd_real_floor"], 2),
               "class_entropy_bits": metrics["class_entropy_bits"], "sample_s": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "lesson01_recipe.jsonl", "a") as file:
            file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
