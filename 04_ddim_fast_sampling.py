"""Lesson 04: DDIM, fast and deterministic sampling from a DDPM without retraining.

Paper: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", 2021, arXiv:2010.02502.
Builds on: lesson 02 (its network and checkpoints are used as they are).
New here:
  - the DDIM update (Eq. 12) on a sub-sequence of the timesteps: 20-50 steps instead of 1000;
  - eta, the noise knob of Eq. 16: eta = 0 is deterministic, eta = 1 is DDPM-like;
  - DDIM inversion: running Eq. 12 backwards from an image to the noise that draws it.
Left out: class guidance (lesson 03); latent space (05).

CPU:  python 04_ddim_fast_sampling.py --checkpoint outputs/02_ddpm/checkpoint.pt    84 s on a 2-core AMD EPYC VM
      (64 images in 50 steps: 11.4 s; lesson 02's 1000 steps took 147 s for them on the same day; the rest
      is steps.png and the inversion sweep)
GPU:  python 04_ddim_fast_sampling.py --checkpoint outputs/02_ddpm/checkpoint.pt --device cuda    (not timed yet)
Compare with DDPM, timed and scored: python examples/compare_methods.py (README, "Lesson 04").
Without --checkpoint it first trains lesson 02's default model with lesson 02's objective.
Writes to outputs/04_ddim_fast_sampling/: samples.png, samples.npz, steps.png (the same noise at
10, 20, 50, 100 and 1000 steps), inversion.png, inversion_error.png (reconstruction error per step
count), denoising.gif, denoising.png; when it trains, also checkpoint.pt, loss.png, metrics.csv; with
--interpolate, also interpolation.png, interpolation.gif and interpolation_grid.png (walks between noises).
"""
import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import data, interpolation, visualize
from utils.runtime import (
    CHECKPOINT_FORMAT, ArgumentParser, Interrupted, LessonError, MetricsLog, StopRequest, last_good, load_checkpoint,
    non_negative_float, pick_device, positive_float, positive_int, run, save_checkpoint, writable_dir,
)

LESSON = "04_ddim_fast_sampling"
T = 1000  # training timesteps, as in lesson 02
BETA_START, BETA_END = 1e-4, 0.02  # DDPM's linear schedule (lesson 02)
COSINE_OFFSET, MAX_BETA = 0.008, 0.999  # Improved DDPM's cosine schedule (lesson 02)
ATTENTION_LEVEL = 1  # as in lesson 02: the network must match lesson 02's checkpoints
EMA_WARMUP = 10
STEP_COUNTS = (10, 20, 50, 100, 1000)  # columns of steps.png
INVERSION_IMAGES = 8  # training images inverted for inversion.png
INVERSION_STEPS = (10, 20, 50, 100, 200)  # step counts of inversion_error.png
STEPS_FIGURE_ROWS = 8  # starting noises in steps.png
LOG_EVERY = 50
GIF_FRAMES = 25  # snapshots along the DDIM chain for denoising.gif
INTERPOLATION_POINTS = 9  # images along each walk of interpolation.png (--interpolate)
INTERPOLATION_GRID = 5  # interpolation_grid.png is 5 x 5
WARMUP_STEPS = 200  # lesson 02's warm-up
EMA_DECAY = 0.999  # lesson 02's EMA decay
CHECKPOINT_EVERY = 500


# --- arguments ---

def channel_mults(text):
    """argparse type: '1,2,4' -> (1, 2, 4)."""
    try:
        mults = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if len(mults) < 2 or min(mults) < 1:
        raise argparse.ArgumentTypeError(f"need at least two multipliers, each at least 1, got {text!r}")
    return mults


def parse_args(argv=None):
    parser = ArgumentParser(description="Lesson 04: DDIM sampling and inversion with a lesson 02 model.")
    parser.add_argument("--checkpoint", default=None,
                        help="a lesson 02 (or 04) checkpoint to sample from; without it, train one first")
    parser.add_argument("--steps", type=positive_int, default=50, help=f"DDIM steps, at most T = {T}")
    parser.add_argument("--eta", type=non_negative_float, default=0.0,
                        help="noise of each step (Eq. 16): 0 deterministic DDIM, 1 DDPM-like (on lesson 02's "
                             "small CPU model, 1 scores better: README, 'Lesson 04')")
    parser.add_argument("--skip", choices=["uniform", "quadratic"], default="uniform",
                        help="which timesteps the steps visit (DDIM Appendix D.2)")
    parser.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True,
                        help="clip the predicted x0 to [-1, 1] in each step")
    parser.add_argument("--dataset", choices=list(data.DATASETS), default=None,
                        help="training images (default: the checkpoint's, else mnist or another one found here)")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=5, help="training passes, without --checkpoint")
    length.add_argument("--max-steps", type=positive_int, default=None, help="stop training after this many steps")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per training step")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (lesson 02's default)")
    parser.add_argument("--width", type=positive_int, default=16, help="channels at full resolution (lesson 02)")
    parser.add_argument("--channel-mults", type=channel_mults, default=(1, 2, 4), help="as in lesson 02")
    parser.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="as in lesson 02")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--out", type=writable_dir, default=f"outputs/{LESSON}", help="output folder")
    parser.add_argument("--num-samples", type=positive_int, default=64, help="images to generate")
    parser.add_argument("--resume", action="store_true", help="continue training from OUT/checkpoint.pt")
    parser.add_argument("--sample-only", action="store_true",
                        help="no training: sample from --checkpoint (default OUT/checkpoint.pt)")
    parser.add_argument("--interpolate", action="store_true",
                        help="also walk between starting noises (slerp and lerp), decoded by DDIM at --steps with "
                             "eta = 0, the deterministic map from noise to image: interpolation.png/.gif and "
                             "interpolation_grid.png")
    args = parser.parse_args(argv)
    if args.steps > T:
        parser.error(f"--steps must be at most T = {T}, the number of training timesteps, got {args.steps}")
    if args.resume and (args.sample_only or args.checkpoint):
        parser.error("--resume continues training in --out; it cannot be used with --sample-only or --checkpoint")
    for channels in (args.width * mult for mult in args.channel_mults):
        if channels % norm_groups(channels):
            parser.error(f"--width {args.width} gives a layer of {channels} channels, which GroupNorm cannot split")
    return args


# --- noise schedule: only alpha_bar is needed by DDIM ---
# Timesteps are 0-based in code: t = 0 .. T-1 here is t = 1 .. T in the papers. DDIM's paper writes
# alpha_t for what DDPM (and this course) calls alpha_bar_t.

def make_alpha_bars(name, device):
    """alpha_bar_t for t = 0 .. T-1 ([T], float32), for lesson 02's linear or cosine schedule."""
    if name == "linear":
        betas = torch.linspace(BETA_START, BETA_END, T, dtype=torch.float64)
    else:
        steps = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((steps / T + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2  # Improved DDPM Eq. 17
        betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    return torch.cumprod(1 - betas, dim=0).float().to(device)


def add_noise(x0, t, eps, alpha_bars):
    """x_t ~ q(x_t | x_0) (DDPM Eq. 4): x0, eps [B, C, H, W], t [B] -> x_t."""
    alpha_bar_t = alpha_bars[t].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


# --- model: lesson 02's U-Net, unchanged, so that lesson 02's checkpoints load as they are ---

def norm_groups(channels):
    """GroupNorm groups: 32 as in the paper, fewer for narrow layers so that a group has 4+ channels."""
    return max(1, min(32, channels // 4))


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
        embedding_dim = 4 * width  # DDPM Appendix B: sinusoidal embedding, then two dense layers of 4x width
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

    The average is smoother than the weights of any one step, which jump around with the gradient noise.
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step):
        """Warm-up: early on, average over about the steps so far, so the random start is forgotten fast."""
        return min(self.decay, (1 + step) / (EMA_WARMUP + step))

    @torch.no_grad()
    def update(self, model, step):
        decay = self.decay_at(step)
        for average, value in zip(self.model.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(value, 1 - decay)  # average = decay * average + (1 - decay) * value
            else:
                average.copy_(value)


# --- loss (lesson 02's, for training without a checkpoint) ---

def loss_fn(model, x0, alpha_bars, generator):
    """DDPM Algorithm 1 on a batch x0 [B, C, H, W], lesson 02's objective: one scalar loss."""
    t = torch.randint(0, T, (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = add_noise(x0, t, eps, alpha_bars)
    # DDPM Eq. 14, L_simple = E ||eps - eps_theta(x_t, t)||^2, in float32 even under mixed precision.
    return F.mse_loss(model(x_t, t).float(), eps)


# --- DDIM sampler ---

def timestep_sequence(steps, skip="uniform"):
    """The timesteps tau_1 < ... < tau_S that DDIM visits (DDIM Section 4.2, Appendix D.2), as a list
    starting at 0 (the paper's t = 1). Sampling walks it from the end back to 0."""
    if skip == "uniform":
        # tau_i = floor(c i) with c = T / S: evenly spaced, 0, T/S, 2T/S, ...
        taus = [int(i * T / steps) for i in range(steps)]
    else:
        # tau_i = floor(c i^2): dense at small t, where the details are decided. The paper's c = 0.8 T / S^2
        # ends near t = 0.8 T, which is almost pure noise on its linear schedule but not on the cosine one
        # (alpha_bar = 0.13 there), so here c makes the last step reach T - 1 on either schedule.
        taus = [int((T - 1) * i * i / max(1, steps - 1) ** 2) for i in range(steps)]
        for i in range(1, steps):  # at small i, floor(c i^2) repeats: keep the steps distinct
            taus[i] = max(taus[i], taus[i - 1] + 1)
    return taus


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta):
    """DDIM Eq. 16: sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev).

    With eta = 1 this is the DDPM posterior's standard deviation between the two steps; with eta = 0, no noise.
    """
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * math.sqrt(1 - alpha_bar_t / alpha_bar_prev)


def ddim_step(model, x_t, t, t_prev, alpha_bars, eta, generator, clip_x0=True):
    """DDIM Eq. 12 from timestep t to t_prev < t (t_prev = -1: to the clean image): x_t [N, C, H, W] -> x_prev."""
    alpha_bar_t = alpha_bars[t]
    alpha_bar_prev = alpha_bars[t_prev] if t_prev >= 0 else 1.0
    eps_pred = model(x_t, torch.full((x_t.shape[0],), t, device=x_t.device)).float()
    # 1. "predicted x0" of Eq. 12: DDPM Eq. 4 solved for x_0.
    x0_pred = (x_t - math.sqrt(1 - alpha_bar_t) * eps_pred) / math.sqrt(alpha_bar_t)
    if clip_x0:
        x0_pred = x0_pred.clamp(-1, 1)
        # Keep the pair consistent: the noise that x_t and the clipped x0 imply.
        eps_pred = (x_t - math.sqrt(alpha_bar_t) * x0_pred) / math.sqrt(1 - alpha_bar_t)
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    # 2. Eq. 12: x_prev = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - sigma^2) eps_pred + sigma z:
    # the predicted image, plus the predicted noise at the level of t_prev ("direction pointing to x_t").
    x_prev = math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(max(0.0, 1 - alpha_bar_prev - sigma ** 2)) * eps_pred
    if sigma > 0:
        x_prev = x_prev + sigma * torch.randn(x_t.shape, device=x_t.device, generator=generator)  # 3. random noise
    return x_prev


@torch.inference_mode()
def ddim_sample(model, alpha_bars, x_T, steps, eta=0.0, skip="uniform", generator=None, clip_x0=True, keep=0):
    """Noise x_T [N, C, H, W] -> images in [-1, 1] in `steps` DDIM steps; also about `keep` snapshots
    along the way, as (timestep, x_t) pairs."""
    constants = alpha_bars.tolist()  # Python floats: no tensor ops around the network in the loop
    taus = timestep_sequence(steps, skip)
    x_t, kept = x_T, []
    every = max(1, steps // keep) if keep else 0
    for index in tqdm(range(steps - 1, -1, -1), desc=f"DDIM {steps} steps", leave=False):
        t_prev = taus[index - 1] if index > 0 else -1
        x_t = ddim_step(model, x_t, taus[index], t_prev, constants, eta, generator, clip_x0)
        if every and (index % every == 0):
            kept.append((max(t_prev, 0), x_t.clamp(-1, 1).cpu()))  # (timestep reached, x at it)
    return x_t.clamp(-1, 1), kept


@torch.inference_mode()
def ddim_invert(model, alpha_bars, x0, steps, skip="uniform"):
    """DDIM inversion: Eq. 12 with eta = 0 run from an image x0 [N, C, H, W] up to the noise x_T that
    deterministic sampling maps back to (nearly) x0. It relies on eps_pred barely changing between steps."""
    constants = alpha_bars.tolist()
    taus = timestep_sequence(steps, skip)
    x_t = x0
    for index in tqdm(range(steps - 1), desc="DDIM inversion", leave=False):
        t, t_next = taus[index], taus[index + 1]
        eps_pred = model(x_t, torch.full((x_t.shape[0],), t, device=x_t.device)).float()
        x0_pred = (x_t - math.sqrt(1 - constants[t]) * eps_pred) / math.sqrt(constants[t])
        # Eq. 12 with sigma = 0, from t up to t_next: the same deterministic map, read the other way.
        x_t = math.sqrt(constants[t_next]) * x0_pred + math.sqrt(1 - constants[t_next]) * eps_pred
    return x_t


# --- training (only without --checkpoint: lesson 02's recipe, on one device, in float32) ---

def train(args, model, ema, images, alpha_bars, config, device, start=None):
    """Lesson 02's training loop, shortened: AdamW, warm-up, clipping, EMA; writes checkpoint and metrics."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    step = 0
    if start is not None:
        model.load_state_dict(start["model"])
        ema.model.load_state_dict(start["ema"])
        optimizer.load_state_dict(start["optimizer"])
        generator.set_state(start["rng"]["generator"])
        torch.set_rng_state(start["rng"]["torch"])
        step = start["step"]
    steps_per_epoch, total_steps = config["steps_per_epoch"], config["total_steps"]
    checkpoint_path, log = args.out / "checkpoint.pt", MetricsLog(args.out / "metrics.csv", append=start is not None)
    progress = tqdm(total=total_steps, initial=step, desc="training", unit="step")
    started, first_step = time.perf_counter(), step
    running_loss, window_start, window_steps, order_epoch = 0.0, started, 0, None
    with StopRequest() as stop:
        while step < total_steps and not stop.requested:
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != order_epoch:  # a fresh shuffle each epoch, seeded by the epoch for --resume
                order, order_epoch = torch.randperm(len(images), generator=torch.Generator().manual_seed(
                    args.seed + epoch)), epoch
            batch = order[position * args.batch_size:(position + 1) * args.batch_size].to(device)
            lr = args.lr * min(1.0, (step + 1) / WARMUP_STEPS)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(model, images[batch], alpha_bars, generator)
            if not torch.isfinite(loss):
                raise LessonError(f"loss became {loss.item()} at step {step}; "
                                  f"{last_good(checkpoint_path)} (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.update(model, step)
            step += 1
            running_loss, window_steps = running_loss + loss.item(), window_steps + 1
            progress.update(1)
            if step % LOG_EVERY == 0 or step == total_steps:
                speed = window_steps * args.batch_size / (time.perf_counter() - window_start)
                log.write(step, running_loss / window_steps, lr, speed)
                running_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
            if step % CHECKPOINT_EVERY == 0 or step == total_steps or stop.requested:
                save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": LESSON, "config": config, "step": step,
                                 "epoch": step // steps_per_epoch, "model": model.state_dict(),
                                 "ema": ema.model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()}},
                                checkpoint_path)
    progress.close()
    log.close()
    if stop.requested:
        raise Interrupted(f"interrupted at step {step} of {total_steps}; checkpoint saved to {checkpoint_path}; "
                          f"continue with --resume")
    if step > first_step:  # not when --resume found the run already finished
        print(f"trained in {(time.perf_counter() - started) / 60:.1f} min")


# --- main ---

def write_figures(model, alpha_bars, config, args, device, images):
    """samples.png/.npz, denoising.gif/.png, steps.png, inversion.png, inversion_error.png; returns the paths."""
    shape = (config["channels"], config["image_size"], config["image_size"])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x_T = torch.randn((args.num_samples, *shape), device=device, generator=generator)
    started = time.perf_counter()
    samples, kept = ddim_sample(model, alpha_bars, x_T, args.steps, args.eta, args.skip, generator, args.clip_x0,
                                keep=GIF_FRAMES)
    print(f"sampled {args.num_samples} images in {time.perf_counter() - started:.1f} s "
          f"({args.steps} DDIM steps, eta = {args.eta:g}, {args.skip})")
    paths = [visualize.save_grid(samples, args.out / "samples.png"),
             visualize.save_samples_npz(samples, args.out / "samples.npz"),
             visualize.save_denoising_gif([x_T.clamp(-1, 1).cpu(), *[x for _, x in kept]], args.out / "denoising.gif")]
    strip = kept[::max(1, len(kept) // 8)]
    if strip[-1] is not kept[-1]:
        strip.append(kept[-1])  # always end at the finished sample
    paths.append(visualize.save_denoising_strip([x_T.clamp(-1, 1).cpu(), *[x for _, x in strip]],
                                                ["noise", *[str(t) for t, _ in strip]], args.out / "denoising.png"))
    # The same starting noises at each step count, deterministic (eta = 0): each row should agree with itself.
    count = min(STEPS_FIGURE_ROWS, args.num_samples)
    rows = [ddim_sample(model, alpha_bars, x_T[:count], steps, 0.0, args.skip, None, args.clip_x0)[0]
            for steps in STEP_COUNTS]
    paths.append(visualize.save_labeled_grid(torch.stack(rows, dim=1).flatten(0, 1), [str(i) for i in range(count)],
                                             [f"{steps} steps" for steps in STEP_COUNTS], args.out / "steps.png",
                                             row_title="starting noise", column_title="DDIM, eta = 0"))
    # Inversion: training images -> their noise -> back again, at --steps, then at each of INVERSION_STEPS.
    originals = images[:INVERSION_IMAGES].to(device)
    errors = {}
    for steps in sorted({args.steps, *INVERSION_STEPS}):
        noise = ddim_invert(model, alpha_bars, originals, steps, args.skip)
        reconstructions, _ = ddim_sample(model, alpha_bars, noise, steps, 0.0, args.skip, None, args.clip_x0)
        errors[steps] = (reconstructions - originals).pow(2).mean().sqrt().item()
        print(f"inversion with {steps} steps: reconstruction RMS error {errors[steps]:.4f} (images span [-1, 1])")
        if steps == args.steps:
            figure = torch.stack([originals, noise.clamp(-3, 3) / 3, reconstructions], dim=0).flatten(0, 1)
            paths.append(visualize.save_labeled_grid(
                figure, ["original", "inverted noise", "reconstruction"], [str(i) for i in range(INVERSION_IMAGES)],
                args.out / "inversion.png", column_title=f"DDIM inversion and sampling, {steps} steps"))
    paths.append(visualize.save_curve(list(errors), list(errors.values()), args.out / "inversion_error.png",
                                      "DDIM steps (inversion, then sampling)", "reconstruction RMS error",
                                      log_x=True, marker="o"))
    return paths


def write_interpolation(model, alpha_bars, shape, args, device):
    """Walks between starting noises, decoded deterministically: interpolation.png/.gif (slerp and lerp
    between the same two noises) and interpolation_grid.png (slerp between four); returns the paths.
    DDIM Section 5.3 shows such interpolations: with eta = 0, nearby x_T give related images."""
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    corners = torch.randn((4, *shape), device=device, generator=generator)
    walks = torch.stack([interpolation.row(corners[0], corners[1], INTERPOLATION_POINTS, method)
                         for method in ("slerp", "lerp")])  # [2, K, C, H, W]
    middle = walks[:, INTERPOLATION_POINTS // 2].flatten(1).norm(dim=1) / corners[:2].flatten(1).norm(dim=1).mean()
    print(f"interpolation: half-way, the noise has {middle[0]:.2f} (slerp) and {middle[1]:.2f} (lerp) times the norm "
          f"of its end points; real noise always has about 1.00")
    decoded, _ = ddim_sample(model, alpha_bars, walks.flatten(0, 1), args.steps, 0.0, args.skip, None, args.clip_x0)
    paths = interpolation.save_interpolation(decoded.view(walks.shape).cpu(), ["slerp", "lerp"],
                                             args.out / "interpolation.png", args.out / "interpolation.gif")
    points = interpolation.grid(list(corners), INTERPOLATION_GRID)
    decoded, _ = ddim_sample(model, alpha_bars, points, args.steps, 0.0, args.skip, None, args.clip_x0)
    paths.append(interpolation.save_grid(decoded.cpu(), INTERPOLATION_GRID, args.out / "interpolation_grid.png"))
    return paths


def load_model(path, device):
    """A lesson 02 or lesson 04 checkpoint -> (EMA network in eval mode, its config)."""
    checkpoint = load_checkpoint(path, ("02_ddpm", LESSON))
    config = checkpoint["config"]
    model = UNet(config["channels"], config["width"], tuple(config["channel_mults"]), config["num_res_blocks"])
    model.load_state_dict(checkpoint["ema"])
    return model.to(device).eval(), config


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.checkpoint or (args.out / "checkpoint.pt" if args.sample_only else None)
    if path is not None:
        model, config = load_model(path, device)
        dataset = data.load_with_fallback(args.dataset or config["dataset"], args.data_dir,
                                          explicit=True, download=False)
    else:
        start = load_checkpoint(args.out / "checkpoint.pt", LESSON) if args.resume else None
        dataset = data.load_with_fallback(args.dataset or "mnist", args.data_dir, explicit=args.dataset is not None,
                                          candidates=["mnist", "fashion-mnist"])
        images = dataset.images.to(device)
        steps_per_epoch = max(1, len(images) // args.batch_size)
        config = {"dataset": dataset.name, "channels": images.shape[1], "image_size": images.shape[-1],
                  "width": args.width, "channel_mults": list(args.channel_mults), "num_res_blocks": 1,
                  "schedule": args.schedule, "steps_per_epoch": steps_per_epoch,
                  "total_steps": args.max_steps or args.epochs * steps_per_epoch}
        model = UNet(config["channels"], args.width, args.channel_mults, 1).to(device)
        ema = EMA(model, EMA_DECAY)
        train(args, model, ema, images, make_alpha_bars(args.schedule, device), config, device, start)
        model = ema.model
        print(f"wrote {visualize.save_loss_curve(args.out / 'metrics.csv', args.out / 'loss.png')}")
    alpha_bars = make_alpha_bars(config["schedule"], device)
    paths = write_figures(model, alpha_bars, config, args, device, dataset.images)
    if args.interpolate:
        shape = (config["channels"], config["image_size"], config["image_size"])
        paths += write_interpolation(model, alpha_bars, shape, args, device)
    for output in paths:
        print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
