"""Lesson 02: the full DDPM, built like the real thing.

Papers: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", 2020, arXiv:2006.11239;
        Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021, arXiv:2102.09672.
Builds on: lesson 01 (forward process, noise prediction, the simple loss, ancestral sampling); lesson 01's
min-SNR weighting of that loss is not used here (not measured on this model).
New here:
  - the paper's U-Net: ResNet blocks with dropout, self-attention, channel multipliers; EMA weights;
  - the cosine schedule, sampling through the posterior q(x_{t-1} | x_t, x_0) with its two variances, and
    what the network predicts: the noise eps (Ho et al.), v (Salimans & Ho 2022, arXiv:2202.00512), or the
    velocity eps - x0 of a straight path from image to noise (flow matching: Liu, Gong & Liu 2022,
    arXiv:2209.03003; Lipman et al. 2022, arXiv:2210.02747; Esser et al. 2024, arXiv:2403.03206, SD3);
  - training as large runs do it: AdamW, warm-up, clipping, checkpoints, mixed precision, several GPUs.
Left out, added later: class conditioning (lesson 03), fast sampling (04), latent space (05).

CPU:  python 02_ddpm.py    about 25-50 min on 2 cores (python GETTING_STARTED.py predicts yours)
GPU:  python 02_ddpm.py --device cuda    1.9 min on one H100 (bf16)
The paper's 35.7M-parameter CIFAR-10 model and recipe (about 14 h on one H100, estimated from the
2012 images/s that benchmarks/lesson02_speed.py measured; not run to the end here):
      python 02_ddpm.py --dataset cifar10 --device cuda --width 128 --channel-mults 1,2,2,2 --num-res-blocks 2
        --dropout 0.1 --lr 2e-4 --warmup-steps 5000 --ema-decay 0.9999 --max-steps 800000
GPUs: torchrun --nproc_per_node 4 02_ddpm.py ...   (same flags; --batch-size is per GPU)
Writes to outputs/02_ddpm/: checkpoint.pt, samples.png, samples.npz, denoising.gif, denoising.png
(x_t and the predicted x_0 along the reverse process), loss.png, metrics.csv, schedules.png.
"""
import argparse
import copy
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from utils import data, visualize
from utils.runtime import (
    CHECKPOINT_FORMAT, SAMPLE_BATCH_SIZE, ArgumentParser, EpochOrder, LessonError, StopRequest, TrainingLog,
    check_finite, check_resume_length, check_timesteps, checkpoint_due, ema_decay_note, given_flags, in_batches,
    load_checkpoint, make_out_dir, mean_over_processes, pick_device, positive_float, positive_int, refuse_different,
    refuse_unused, require_same, run, save_checkpoint, saved_timesteps, set_learning_rate, stopped_early,
    warmup_learning_rate, writable_dir)

LESSON = "02_ddpm"
T = 1000  # number of diffusion steps, as in both papers (the default of --timesteps)
BETA_START, BETA_END = 1e-4, 0.02  # DDPM Section 4: the linear schedule
COSINE_OFFSET = 0.008  # Improved DDPM Section 3.2: s, so that beta_t is not too small near t = 0
MAX_BETA = 0.999  # Improved DDPM Section 3.2: betas clipped to avoid a singularity at t = T
FLOW_TIME_SCALE = 1000  # a flow model is told its time t in [0, 1] as t x 1000, as SD3's timesteps are
ATTENTION_LEVEL = 1  # self-attention at the second resolution: 16x16 for CIFAR-10 as in DDPM, 14x14 for MNIST
EMA_WARMUP = 10  # EMA decay starts at 1/10 and rises as (1 + step) / (10 + step) towards --ema-decay
LOG_EVERY = 50  # steps between rows of metrics.csv
GIF_FRAMES = 40  # snapshots of the reverse process kept for denoising.gif
ARCHITECTURE_KEYS = ("channels", "image_size", "width", "channel_mults", "num_res_blocks", "schedule")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- arguments ---

def channel_mults(text):
    """argparse type: '1,2,2' -> (1, 2, 2), one multiplier of --width per resolution."""
    try:
        mults = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if len(mults) < 2 or min(mults) < 1:
        raise argparse.ArgumentTypeError(f"need at least two multipliers, each at least 1, got {text!r}")
    return mults


def parse_args(argv=None):
    parser = ArgumentParser(description="Lesson 02: train the full DDPM, then sample from its EMA weights.")
    parser.add_argument("--dataset", type=data.dataset_or_folder, default=None,
                        help=data.DATASET_HELP + "; default: mnist, or another one found here when mnist is not")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    data.add_folder_arguments(parser)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=5, help="passes over the training set")
    length.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps instead")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step and process (paper: 128)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate after warm-up "
                        "(paper: 2e-4 for CIFAR-10; a small model in a short run learns faster at 1e-3)")
    parser.add_argument("--warmup-steps", type=int, default=200, help="steps of linear learning-rate warm-up (DDPM's released code: 5000)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (paper: none)")
    parser.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the gradient norm to this (DDPM's released code: 1)")
    parser.add_argument("--ema-decay", type=float, default=0.999,
                        help="EMA decay of the sampling weights; averages over ~1/(1-decay) steps (paper: 0.9999). "
                             "The warm-up (1 + step) / (10 + step) is used while it is lower: 0.999 from step 8990 on")
    parser.add_argument("--schedule", choices=["cosine", "linear"], default="cosine",
                        help="noise schedule: cosine (Nichol & Dhariwal) or linear (Ho et al.)")
    parser.add_argument("--timesteps", type=positive_int, default=None,
                        help=f"diffusion steps T (default {T}; try 500 or 2000): the schedule is drawn over T steps "
                             f"(linear betas scaled by 1000 / T); a checkpoint keeps its own T")
    parser.add_argument("--prediction", choices=["eps", "v", "flow"], default="v",
                        help="what the network predicts: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & "
                             "Ho 2022); eps, the noise (paper); or flow, the velocity eps - x0 along the straight path "
                             "x_t = (1 - t) x0 + t eps, t in [0, 1] (rectified flow, SD3): docs/lesson02.md "
                             "'eps, v or flow?'")
    parser.add_argument("--weighting-scheme", choices=["logit_normal", "none"], default=None,
                        help="with --prediction flow, how training draws t, named as in diffusers' SD3 scripts: "
                             "logit_normal (logit(t) ~ N(0, 1), SD3 Section 3.1; the default) or none (uniform)")
    parser.add_argument("--variance", choices=["posterior", "beta"], default="posterior",
                        help="sampling variance sigma_t^2: the posterior's beta_tilde_t, or beta_t (paper: both work)")
    parser.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True,
                        help="clip the predicted x0 to [-1, 1] while sampling, as the paper's code does")
    parser.add_argument("--width", type=positive_int, default=16, help="channels at full resolution (DDPM's released code: 128)")
    parser.add_argument("--channel-mults", type=channel_mults, default=(1, 2, 4),
                        help="width multiplier per resolution (DDPM's released code: 1,2,2,2 for 32x32)")
    parser.add_argument("--num-res-blocks", type=positive_int, default=1, help="ResNet blocks per resolution (paper: 2)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout in ResNet blocks (paper: 0.1 on CIFAR-10)")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="auto: bf16 (or fp16) mixed precision on CUDA, fp32 elsewhere")
    parser.add_argument("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="random seed for data order, noise and sampling")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--out", type=writable_dir, default=f"outputs/{LESSON}", help="output folder")
    parser.add_argument("--num-samples", type=positive_int, default=64,
                        help="images to generate at the end (all in samples.npz; samples.png shows 64)")
    parser.add_argument("--sample-batch-size", type=positive_int, default=SAMPLE_BATCH_SIZE,
                        help="images per sampling batch, whatever --num-samples is "
                             "(docs/lesson04.md \"Sampling many images\")")
    parser.add_argument("--resume", action="store_true", help="continue training from OUT/checkpoint.pt")
    parser.add_argument("--sample-only", action="store_true", help="no training: sample from --checkpoint")
    parser.add_argument("--checkpoint", default=None, help="checkpoint for --sample-only (default OUT/checkpoint.pt)")
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)  # the flags the user wrote: those a run would ignore are refused
    if args.checkpoint is not None and not args.sample_only:
        parser.error("--checkpoint is read only with --sample-only; to go on training, --resume reads "
                     "OUT/checkpoint.pt")
    data.check_folder_arguments(parser, args)
    data.check_unet_arguments(parser, args)  # the same refusals in every copy of lesson 02's U-Net
    if args.resume and args.sample_only:
        parser.error("--resume and --sample-only cannot be used together")
    check_timesteps(parser, args.timesteps, linear=args.schedule == "linear", beta_end=BETA_END)
    if args.weighting_scheme is not None and args.prediction != "flow":
        parser.error(f"--weighting-scheme chooses the times a flow model trains on; it needs --prediction flow, "
                     f"not {args.prediction}")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.warmup_steps < 0 or args.weight_decay < 0:
        parser.error("--warmup-steps and --weight-decay cannot be negative")
    return args


# --- noise schedules ---
# Timesteps are 0-based in code: t = 0 .. T-1 here is t = 1 .. T in the papers. alpha_bar_prev at
# t = 0 is 1: before the first step the image is clean.

def make_schedule(name, device, timesteps=T):
    """Every per-step constant of the forward process and the posterior, each [timesteps], float32 on `device`."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64)  # computed in float64 (MPS has none: stored as float32)
    if name == "linear":
        # DDPM's betas are for T = 1000; for another T, scaled by 1000 / T (as improved-diffusion's code does).
        scale = 1000 / timesteps
        betas = torch.linspace(BETA_START * scale, BETA_END * scale, timesteps, dtype=torch.float64)
    else:
        # Improved DDPM Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(pi/2 * (t/T + s) / (1 + s)). Noise is
        # added more slowly than with linear betas, so fewer steps are wasted on images that are pure noise.
        f = torch.cos((steps / timesteps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        # Improved DDPM Section 3.2: beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999.
        betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    alphas = 1 - betas
    # DDPM Section 2: alpha_bar_t = prod_{s<=t} alpha_s (diffusers calls it alphas_cumprod).
    alpha_bars = torch.cumprod(alphas, dim=0)
    alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    schedule = {
        "betas": betas, "alphas": alphas, "alpha_bars": alpha_bars, "alpha_bars_prev": alpha_bars_prev,
        # DDPM Eq. 6: q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde_t I), with Eq. 7's
        # mu_tilde = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t
        "posterior_x0_weights": alpha_bars_prev.sqrt() * betas / (1 - alpha_bars),
        "posterior_xt_weights": alphas.sqrt() * (1 - alpha_bars_prev) / (1 - alpha_bars),
        # beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t: 0 at t = 0, where x_0 is known.
        "posterior_variances": (1 - alpha_bars_prev) / (1 - alpha_bars) * betas,
    }
    return {key: values.float().to(device) for key, values in schedule.items()}


def add_noise(x0, t, eps, schedule):
    """Sample x_t ~ q(x_t | x_0) (DDPM Eq. 4): x0, eps [B, C, H, W], t [B] -> x_t [B, C, H, W]."""
    alpha_bar_t = schedule["alpha_bars"][t].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


# --- model: the U-Net of DDPM Appendix B (its sizes from DDPM's released code) ---

def norm_groups(channels):
    """GroupNorm groups: 32 as in the paper, fewer for narrow layers so that a group has 4+ channels, and always
    a divisor of `channels` (a 144-channel layer gets 24 groups of 6), so that every width builds."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps t [B] -> [B, dim] (Vaswani et al. 2017, Sec. 3.5)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class SelfAttention(nn.Module):
    """Single-head self-attention across the H*W positions, with a residual: [B, C, H, W] -> same.

    Convolutions only see neighbours; attention lets every position look at every other one.
    """

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)  # as in the paper's code: each block starts as the identity
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)  # [B, C, HW] each
        # softmax(q^T k / sqrt(C)) v (Vaswani et al. 2017, Eq. 1): weights [B, HW, HW] over all positions.
        weights = torch.softmax((q / math.sqrt(channels)).transpose(1, 2) @ k, dim=-1)  # scale the small q
        h = v @ weights.transpose(1, 2)  # [B, C, HW]: each position a weighted mix of every position's v
        return x + self.out(h.reshape(batch, channels, height, width))


class ResBlock(nn.Module):
    """DDPM's residual block, optionally followed by self-attention: [B, in, H, W] -> [B, out, H, W].

    norm-SiLU-conv, plus a projection of the time embedding, then norm-SiLU-dropout-conv, plus a shortcut.
    """

    def __init__(self, in_channels, out_channels, embedding_dim, dropout, attention=False):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding_dim, out_channels)
        self.norm2 = nn.GroupNorm(norm_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # as in the paper's code: the block starts as its shortcut
        nn.init.zeros_(self.conv2.bias)
        same = in_channels == out_channels
        self.shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)
        self.attention = SelfAttention(out_channels) if attention else nn.Identity()

    def forward(self, x, embedding):
        h = self.conv1(F.silu(self.norm1(x)))
        # The time embedding, through its own linear layer, becomes one bias per channel.
        h = h + self.time(F.silu(embedding))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attention(self.shortcut(x) + h)


class Level(nn.Module):
    """One resolution of the U-Net: ResNet blocks, then a resize (strided conv down, or nearest-neighbour
    upsampling and a conv up), or no resize at the bottom of the down path and the top of the up path."""

    def __init__(self, blocks, resize):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resize = resize


class UNet(nn.Module):
    """eps_pred = model(x_t, t): [B, C, H, W] and [B] -> [B, C, H, W]; H, W divisible by 2^(levels-1).

    Default on 28x28: 28 -> 14 -> 7 with 16, 32, 64 channels, attention at 14x14 and at 7x7 in the
    middle; the up path mirrors the down path and concatenates the output of every down block.
    """

    def __init__(self, channels=1, width=16, channel_mults=(1, 2, 4), num_res_blocks=1, dropout=0.0):
        super().__init__()
        self.width = width
        embedding_dim = 4 * width  # DDPM's released code: sinusoidal embedding, then two dense layers of 4x width
        self.time_mlp = nn.Sequential(nn.Linear(width, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        skip_channels, current = [width], width
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mults):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(current, width * mult, embedding_dim, dropout, level == ATTENTION_LEVEL))
                current = width * mult
                skip_channels.append(current)
            downsample = None
            if level < len(channel_mults) - 1:  # the lowest resolution is not halved again
                downsample = nn.Conv2d(current, current, 3, stride=2, padding=1)
                skip_channels.append(current)
            self.down.append(Level(blocks, downsample))
        self.middle = nn.ModuleList([ResBlock(current, current, embedding_dim, dropout, attention=True),
                                     ResBlock(current, current, embedding_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            blocks = []
            for _ in range(num_res_blocks + 1):  # one more than down: it also takes the resize's skip
                blocks.append(ResBlock(current + skip_channels.pop(), width * mult, embedding_dim, dropout,
                                       level == ATTENTION_LEVEL))
                current = width * mult
            upsample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                     nn.Conv2d(current, current, 3, padding=1))
            self.up.append(Level(blocks, upsample if level > 0 else None))
        self.head = nn.Sequential(nn.GroupNorm(norm_groups(current), current), nn.SiLU(),
                                  nn.Conv2d(current, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # as in the paper's code: the network starts by predicting 0
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x_t, t):
        embedding = self.time_mlp(timestep_embedding(t, self.width))
        h = self.stem(x_t)
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, embedding)
                skips.append(h)
            if level.resize is not None:
                h = level.resize(h)
                skips.append(h)
        for block in self.middle:
            h = block(h, embedding)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), embedding)
            if level.resize is not None:
                h = level.resize(h)
        return self.head(h)


def build_model(config):
    """The U-Net a checkpoint's config describes (lesson 04 builds the same one from the same keys)."""
    return UNet(config["channels"], config["width"], tuple(config["channel_mults"]), config["num_res_blocks"],
                config.get("dropout", 0.0))


class EMA:
    """Exponential moving average of the weights (DDPM Appendix B): the weights used for sampling.

    The average is smoother than the weights of any one step, which jump around with the gradient noise: in
    this lesson's default run, sampling its last weights instead drew pictures 44 FD further from the data
    (docs/lesson02.md "Lessons learned").
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step):
        """Warm-up: at step n the decay is (1 + n) / (10 + n), an average over about the last ninth of the steps so
        far, so the random start is forgotten fast; an average over the last third measured worse here (docs/lesson02.md "Lessons learned")."""
        return min(self.decay, (1 + step) / (EMA_WARMUP + step))

    @torch.no_grad()
    def update(self, model, step):
        decay = self.decay_at(step)
        for average, value in zip(self.model.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(value, 1 - decay)  # average = decay * average + (1 - decay) * value
            else:
                average.copy_(value)


# --- loss ---

def loss_fn(model, x0, schedule, generator, prediction="eps", weighting_scheme="logit_normal"):
    """DDPM Algorithm 1 on a batch x0 [B, C, H, W] in [-1, 1]: one scalar loss; for prediction "flow", the flow
    matching loss instead (flow_loss)."""
    if prediction == "flow":
        return flow_loss(model, x0, generator, weighting_scheme)
    timesteps = len(schedule["betas"])  # T
    t = torch.randint(0, timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = add_noise(x0, t, eps, schedule)
    if prediction == "eps":
        target = eps  # DDPM Eq. 14, L_simple = E ||eps - eps_theta(x_t, t)||^2
    else:
        # Salimans & Ho 2022, Section 4: v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0. Near t = T, where
        # x_t is almost all noise, v is about -x0: the network answers "which image?" instead of returning its input.
        alpha_bar_t = schedule["alpha_bars"][t].view(-1, 1, 1, 1)
        target = alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0
    return F.mse_loss(model(x_t, t).float(), target)  # in float32 even under mixed precision


def flow_time_sample(count, generator, device, weighting_scheme="logit_normal"):
    """Times t [count] in (0, 1) for flow training: logit_normal draws logit(t) ~ N(0, 1), t = sigmoid of it (SD3,
    Esser et al. 2024, Section 3.1: more training in the middle, where the velocity is hardest to guess); none
    draws t uniformly in [0, 1) (rectified flow, Liu et al. 2022). Raises ValueError for another scheme."""
    if weighting_scheme == "logit_normal":
        return torch.sigmoid(torch.randn(count, device=device, generator=generator))
    if weighting_scheme == "none":
        return torch.rand(count, device=device, generator=generator)
    raise ValueError(f"unknown weighting scheme {weighting_scheme!r}: logit_normal or none")


def flow_loss(model, x0, generator, weighting_scheme="logit_normal"):
    """Flow matching on a batch x0 [B, C, H, W] in [-1, 1] (rectified flow, Liu et al. 2022, Eq. 1, in SD3's
    direction): x_t = (1 - t) x0 + t eps is a straight line from the image (t = 0) to noise (t = 1), and the
    network learns its velocity dx_t/dt = eps - x0. No schedule: the path itself fixes how much noise each t holds."""
    t = flow_time_sample(x0.shape[0], generator, x0.device, weighting_scheme)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * eps
    return F.mse_loss(model(x_t, t * FLOW_TIME_SCALE).float(), eps - x0)


def flow_point(x_t, alpha_bar_t):
    """The flow path's twin of a point of this schedule: x_t [N, C, H, W] = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar)
    eps, divided by sqrt(alpha_bar) + sqrt(1 - alpha_bar), is (1 - s) x0 + s eps with s = sqrt(1 - alpha_bar) /
    (sqrt(alpha_bar) + sqrt(1 - alpha_bar)): the same image and noise, in the same proportion (the same SNR).
    Returns (x on the flow path, its time s in [0, 1]); this is how a flow model is asked about any x_t."""
    signal, noise = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    return x_t / (signal + noise), noise / (signal + noise)


# --- sampler ---

def sampling_constants(schedule, variance):
    """Per-step floats for the sampling loop (Python numbers cost no tensor ops): a dict of [T] lists."""
    names = ("alpha_bars", "posterior_x0_weights", "posterior_xt_weights")
    constants = {name: schedule[name].tolist() for name in names}
    # DDPM Section 3.2: sigma_t^2 = beta_t or beta_tilde_t; "both had similar results" on their models.
    # beta_t is optimal when x_0 is pure noise, beta_tilde_t when x_0 is a single fixed point.
    variances = schedule["betas" if variance == "beta" else "posterior_variances"]
    constants["sigmas"] = variances.sqrt().tolist()
    return constants


def sample_step(model, x_t, t, constants, generator, clip_x0=True, prediction="eps"):
    """One reverse step through the posterior: x_t [N, C, H, W] at timestep t -> (x_{t-1}, x0_pred)."""
    alpha_bar_t = constants["alpha_bars"][t]
    if prediction == "flow":
        # 1. A flow model knows the straight path, not this schedule: ask it at x_t's twin there (flow_point),
        # then x_s = (1 - s) x0 + s eps and velocity = eps - x0 give x0_pred = x_s - s velocity_pred.
        x_flow, s = flow_point(x_t, alpha_bar_t)
        x0_pred = x_flow - s * model(x_flow, torch.full((x_t.shape[0],), s * FLOW_TIME_SCALE, device=x_t.device)).float()
    elif prediction == "eps":
        output = model(x_t, torch.full((x_t.shape[0],), t, device=x_t.device)).float()
        # 1. DDPM Eq. 4 solved for x_0: x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps_pred) / sqrt(alpha_bar_t).
        x0_pred = (x_t - math.sqrt(1 - alpha_bar_t) * output) / math.sqrt(alpha_bar_t)
    else:
        # 1. From v: x0_pred = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v_pred (Salimans & Ho 2022, Section 4).
        output = model(x_t, torch.full((x_t.shape[0],), t, device=x_t.device)).float()
        x0_pred = math.sqrt(alpha_bar_t) * x_t - math.sqrt(1 - alpha_bar_t) * output
    if clip_x0:
        x0_pred = x0_pred.clamp(-1, 1)  # images live in [-1, 1]; without clipping this is exactly Eq. 11
    # 2. DDPM Eq. 7: the mean of q(x_{t-1} | x_t, x_0 = x0_pred).
    mean = constants["posterior_x0_weights"][t] * x0_pred + constants["posterior_xt_weights"][t] * x_t
    if t == 0:
        return mean, x0_pred  # Algorithm 2: no noise on the last step
    # 3. Algorithm 2, line 4: x_{t-1} = mean + sigma_t z.
    noise = torch.randn(x_t.shape, device=x_t.device, generator=generator)
    return mean + constants["sigmas"][t] * noise, x0_pred


@torch.inference_mode()
def sample(model, schedule, shape, generator, variance="posterior", clip_x0=True, prediction="eps", keep=()):
    """Pure noise [N, C, H, W] -> images in [-1, 1] after T reverse steps; also {t: (x_t, x0_pred)} for t in
    `keep`: the sample as it enters step t and the model's guess of the final image from it."""
    constants = sampling_constants(schedule, variance)
    x_t = torch.randn(shape, device=schedule["betas"].device, generator=generator)
    kept = {}
    for t in tqdm(range(len(constants["sigmas"]) - 1, -1, -1), desc="sampling", leave=False):
        x_prev, x0_pred = sample_step(model, x_t, t, constants, generator, clip_x0, prediction)
        if t in keep:
            kept[t] = (x_t.clamp(-1, 1).cpu(), x0_pred.clamp(-1, 1).cpu())
        x_t = x_prev
    return x_t.clamp(-1, 1), kept


# --- training ---

def mixed_precision(precision, device):
    """The autocast dtype for --precision (None: float32). Only CUDA runs in reduced precision here."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if PRECISIONS[precision] is not None and device.type != "cuda":
        raise LessonError(f"--precision {precision} needs a CUDA device; on {device.type} use --precision fp32")
    return PRECISIONS[precision]


def gather_rng_states(generator, world_size):
    """The random states of every process (each draws its own noise), for an exact --resume."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states, generator, rank):
    state = states[rank]
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def update_weights(loss, model, optimizer, scaler, grad_clip):
    """One AdamW step: backward (fp16: through a scaled loss), gradient-norm clipping, update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # DDPM's code clips at norm 1
    scaler.step(optimizer)  # skipped by fp16's scaler when the gradient overflowed
    scaler.update()


def make_state(model, ema, optimizer, scaler, step, generator, config, world_size):
    """Everything --resume needs to continue exactly where training stopped (every process must call it)."""
    return {"format": CHECKPOINT_FORMAT, "lesson": LESSON, "config": config, "step": step,
            "epoch": step // config["steps_per_epoch"], "model": model.state_dict(), "ema": ema.model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": gather_rng_states(generator, world_size)}


def train(args, model, ema, images, schedule, config, device, rank, world_size, start=None):
    """Train on `images` [N, C, H, W] (in memory on `device`); rank 0 writes checkpoint.pt and metrics.csv."""
    network = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype = mixed_precision(args.precision, device)
    # fp16 overflows without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)  # each process its own noise
    step = 0
    if start is not None:  # --resume: every state that decides what comes next
        model.load_state_dict(start["model"])
        ema.model.load_state_dict(start["ema"])
        optimizer.load_state_dict(start["optimizer"])
        if "weight_decay" in getattr(args, "given", ()):  # the saved optimizer state carries its own; the user's wins
            for group in optimizer.param_groups:
                group["weight_decay"] = args.weight_decay
        scaler.load_state_dict(start["scaler"])
        restore_rng_states(start["rng"], generator, rank)
        step = start["step"]
    total_steps, checkpoint_path = config["total_steps"], args.out / "checkpoint.pt"
    # DistributedSampler gives each process its own share of a fresh shuffle every epoch.
    sampler = DistributedSampler(range(len(images)), world_size, rank, shuffle=True, seed=args.seed, drop_last=True)

    def share_of_shuffle(epoch):
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler))

    order = EpochOrder(len(images), args.batch_size, config["steps_per_epoch"], args.seed, share_of_shuffle)
    log = TrainingLog(args.out / "metrics.csv", total_steps, step, args.batch_size * world_size, LOG_EVERY,
                      start is not None, enabled=rank == 0)
    network.train()
    with StopRequest() as stop:
        while step < total_steps:
            # a batch of clean images x0, and this step's learning rate
            x0 = images[order.batch(step).to(device)]
            lr = warmup_learning_rate(step, args.lr, args.warmup_steps)
            set_learning_rate(optimizer, lr)
            # the loss (DDPM Algorithm 1, or its v target), in mixed precision on CUDA
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                loss = loss_fn(network, x0, schedule, generator, config["prediction"],
                               config.get("weighting_scheme", "logit_normal"))
            # every process must take the same decisions: the mean loss, and whether any was asked to stop
            mean_loss, stop_votes = mean_over_processes([loss.item(), float(stop.requested)], world_size, device)
            check_finite(mean_loss, step, checkpoint_path)
            # the update, then the EMA of the weights that sampling uses
            update_weights(loss, model, optimizer, scaler, args.grad_clip)
            ema.update(model, step)
            step += 1
            # log, and save what --resume needs (every process takes part in gathering the random states)
            log.add(step, mean_loss, lr)
            stopping = stop_votes > 0
            if checkpoint_due(step, total_steps, args.checkpoint_every, stopping):
                state = make_state(model, ema, optimizer, scaler, step, generator, config, world_size)
                if rank == 0:
                    save_checkpoint(state, checkpoint_path)
            if stopping:
                break
    log.close()
    if step < total_steps:
        raise stopped_early(step, total_steps, checkpoint_path)


# --- main ---

def write_samples(model, schedule, config, args, device):
    """Sample --num-samples images and write samples.png/.npz, denoising.gif/.png; return the paths."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    shape = (config["channels"], config["image_size"], config["image_size"])
    timesteps = len(schedule["betas"])
    gif_steps, strip_steps = visualize.gif_steps(timesteps, GIF_FRAMES), visualize.strip_steps(timesteps)
    amp_dtype = mixed_precision(args.precision, device)

    def draw(start, count):
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            return sample(model, schedule, (count, *shape), generator, args.variance, args.clip_x0,
                          config.get("prediction", "eps"), keep={*gif_steps, *strip_steps})

    started = time.perf_counter()
    images, kept = in_batches(args.num_samples, args.sample_batch_size, draw)
    print(f"sampled {args.num_samples} images in {time.perf_counter() - started:.1f} s ({timesteps} steps)")
    images, first_batch = images.float(), min(args.num_samples, args.sample_batch_size)  # kept: the first batch
    return [
        visualize.save_samples_grid(images, args.out / "samples.png"),
        visualize.save_samples_npz(images, args.out / "samples.npz"),
        visualize.save_denoising_gif([kept[t][0] for t in gif_steps] + [images[:first_batch]],
                                     args.out / "denoising.gif"),
        # x_t beside x0_pred: the large structure is decided early, the details in the last few hundred steps.
        visualize.save_reverse_process([kept[t][0] for t in strip_steps], [kept[t][1] for t in strip_steps],
                                       strip_steps, args.out / "denoising.png", rows=min(3, first_batch)),
    ]


def setup_processes(device_name):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process, or gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "mps":
        raise LessonError("several processes cannot share one Apple MPS device; run without torchrun")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LessonError(f"process {local_rank} on this machine has no GPU: {torch.cuda.device_count()} visible; "
                              f"start at most that many processes per machine, or use --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:  # the processes on this machine share its cores
        torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def load_training_data(args, rank, world_size, saved=None):
    """Rank 0 finds the dataset (maybe downloading it); the other processes then load the same one."""
    if rank == 0:
        dataset = data.load_training_data(args, saved)
    if world_size > 1:
        chosen = [dataset.name if rank == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        if rank != 0:  # an image folder: read from the cache that rank 0 has just written
            dataset = data.load_training_data(args) if args.image_folder else data.load_dataset(
                chosen[0], args.data_dir, download=False)
    return dataset


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rank, world_size, device = setup_processes(args.device)
    mixed_precision(args.precision, device)  # refuse an impossible --precision before any work
    try:
        train_and_sample(args, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train_and_sample(args, rank, world_size, device):
    if rank == 0:
        make_out_dir(args.out)
    if args.sample_only:
        path = args.checkpoint or args.out / "checkpoint.pt"
        checkpoint = load_checkpoint(path, LESSON)
        config = checkpoint["config"]
        data.check_sample_settings(config, args, path)
        refuse_unused(args, ("epochs", "max_steps", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip",
                             "ema_decay", "checkpoint_every"), "with --sample-only: it trains nothing")
        refuse_different(args, config, ("schedule", "prediction", "weighting_scheme", "width", "channel_mults",
                                        "num_res_blocks", "dropout"), path)
        schedule = make_schedule(config["schedule"], device, saved_timesteps(config, args.timesteps, path))
        model = build_model(config).to(device)
        model.load_state_dict(checkpoint["ema"])
        if rank == 0:
            for path in write_samples(model.eval(), schedule, config, args, device):
                print(f"wrote {path}")
        return
    start = load_checkpoint(args.out / "checkpoint.pt", LESSON) if args.resume else None
    dataset = load_training_data(args, rank, world_size, start and start["config"])
    images = dataset.images.to(device)
    size = images.shape[-1]
    data.check_unet_fits(dataset, args.channel_mults)  # the same refusal in every copy of the U-Net
    steps_per_epoch = data.batches_per_epoch(len(images), args.batch_size, world_size)  # refuses a batch too big
    config = {**data.data_config(dataset), "channels": images.shape[1], "image_size": size, "width": args.width,
              "channel_mults": list(args.channel_mults), "num_res_blocks": args.num_res_blocks,
              "dropout": args.dropout, "schedule": args.schedule, "prediction": args.prediction,
              **({"weighting_scheme": args.weighting_scheme or (start or {}).get("config", {}).get("weighting_scheme")
                  or "logit_normal"} if args.prediction == "flow" else {}),
              "timesteps": saved_timesteps(start["config"], args.timesteps, args.out / "checkpoint.pt") if start
              else args.timesteps or T,
              "batch_size": args.batch_size, "world_size": world_size, "seed": args.seed,
              "steps_per_epoch": steps_per_epoch, "total_steps": args.max_steps or args.epochs * steps_per_epoch}
    if start is not None:
        resume_keys = ("prediction", "weighting_scheme", *data.data_keys(config), "batch_size", "world_size", "seed")
        require_same(start["config"], config, ARCHITECTURE_KEYS + resume_keys, args.out / "checkpoint.pt")
        check_resume_length(start, config["total_steps"], args.out / "checkpoint.pt")
    model = build_model(config).to(device)
    ema = EMA(model, args.ema_decay)
    schedule = make_schedule(args.schedule, device, config["timesteps"])
    if rank == 0:
        print(f"{dataset.name}: {len(images)} images {tuple(images.shape[1:])} from {dataset.source}; "
              f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}; "
              f"{config['total_steps']} steps of {args.batch_size} x {world_size} process(es) = "
              f"{args.batch_size * world_size} images")
        if note := ema_decay_note(ema, config["total_steps"]):
            print(note)
    train(args, model, ema, images, schedule, config, device, rank, world_size, start)
    if rank != 0:
        return
    paths = [args.out / "checkpoint.pt", args.out / "metrics.csv",
             visualize.save_loss_curve(args.out / "metrics.csv", args.out / "loss.png"),
             # This lesson's two schedules side by side: the cosine one keeps more signal for longer.
             visualize.save_schedules({name: make_schedule(name, "cpu", config["timesteps"])["betas"]
                                                 for name in ("linear", "cosine")},
                                      args.out / "schedules.png")]
    paths += write_samples(ema.model, schedule, config, args, device)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
