"""Lesson 05: latent diffusion, the idea behind Stable Diffusion, at laptop scale.

Paper: Rombach, Blattmann, Lorenz, Esser & Ommer, "High-Resolution Image Synthesis with Latent
Diffusion Models", 2022, arXiv:2112.10752 (also: Kingma & Welling, "Auto-Encoding Variational Bayes",
2014, arXiv:1312.6114).
Builds on: lesson 02 (U-Net, cosine schedule, EMA, training) and lesson 04 (DDIM sampling).
New here:
  - stage 1: a variational autoencoder that compresses each image 4x per side (f = 4) into a small
    latent, regularised towards N(0, I) by a small KL term, and a scale factor for unit-variance latents;
  - stage 2: the DDPM objective on latents instead of pixels, then DDIM in latent space and one decode.
Left out: the perceptual and adversarial losses of the paper's autoencoders, and text conditioning.

CPU:  python 05_latent_diffusion.py    about 15-25 min on 2 cores (python GETTING_STARTED.py predicts yours)
GPU:  python 05_latent_diffusion.py --device cuda    (not timed yet)
Writes to outputs/05_latent_diffusion/: autoencoder.pt, checkpoint.pt, reconstructions.png, latents.png,
samples.png, samples.npz, denoising.gif, denoising.png, loss.png, autoencoder_loss.png, metrics.csv,
autoencoder_metrics.csv; with --interpolate, also interpolation.png, interpolation.gif and
interpolation_grid.png (walks between latent noises).
"""
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import data, interpolation, visualize
from utils.runtime import (
    CHECKPOINT_FORMAT, ArgumentParser, EpochOrder, LessonError, StopRequest, TrainingLog, check_finite,
    check_resume_length, check_steps, check_timesteps, checkpoint_due, ema_decay_note, given_flags, in_batches,
    load_checkpoint, make_out_dir, non_negative_float, pick_device, positive_float, positive_int, refuse_different,
    refuse_unused, require_same, run, same_weights, save_checkpoint, saved_timesteps, set_learning_rate,
    stopped_early, warmup_learning_rate, writable_dir)

LESSON = "05_latent_diffusion"
AUTOENCODER_LESSON = "05_latent_diffusion/autoencoder"  # the `lesson` name inside autoencoder.pt
T = 1000  # diffusion timesteps, as in lessons 02-04 (the default of --timesteps)
DEFAULT_STEPS = 200  # DDIM steps when sampling
# The DDIM paper's leading spacing, not lesson 04's trailing: trailing starts at t = T - 1, where the cosine
# schedule's alpha_bar is 2.4e-9, and z0_pred = (z_t - sqrt(1 - alpha_bar) eps_pred) / sqrt(alpha_bar) multiplies
# the network's error in eps by 1 / sqrt(alpha_bar) = 20,000. Lesson 04 clips x0_pred to the pixels' [-1, 1]
# there, or predicts v; latents have no range to clip to, and this model predicts eps. Measured on the default
# model (docs/lesson05.md "Why lesson 05 starts at the DDIM paper's timesteps"): trailing drew decoded noise (FD 383 at 1000 samples), leading garments.
DEFAULT_SPACING = "leading"
COSINE_OFFSET, MAX_BETA = 0.008, 0.999  # Improved DDPM's cosine schedule (lesson 02)
ATTENTION_MAX_SIZE = 16  # self-attention at resolutions of 16x16 and below (DDPM: at 16x16)
EMA_WARMUP = 10  # as in lesson 02
WARMUP_STEPS = 200  # learning-rate warm-up of both stages (lesson 02)
GRAD_CLIP = 1.0  # lesson 02
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the encoder's log-variance, as the paper's code does, against overflow
LOG_EVERY = 50
CHECKPOINT_EVERY = 500
SHOWN_IMAGES = 8  # images in reconstructions.png and latents.png
GIF_FRAMES = 25
INTERPOLATION_POINTS = 9  # images along each walk of interpolation.png (--interpolate)
INTERPOLATION_GRID = 5  # interpolation_grid.png is 5 x 5
LATENT_SAMPLE_BATCH_SIZE = 256  # 7x7x4 latents: 2.1x faster per latent than 64 (benchmarks/sample_batch.py)


# --- arguments ---

def parse_args(argv=None):
    parser = ArgumentParser(description="Lesson 05: an autoencoder, then diffusion in its latent space.")
    parser.add_argument("--stage", choices=["autoencoder", "diffusion", "all"], default="all",
                        help="train the autoencoder, the latent diffusion model (reusing OUT/autoencoder.pt), or both")
    parser.add_argument("--dataset", type=data.dataset_or_folder, default=None,
                        help=data.DATASET_HELP + "; default: mnist, or another one found here when mnist is not")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    data.add_folder_arguments(parser)
    parser.add_argument("--autoencoder-epochs", type=positive_int, default=2, help="stage 1 passes over the data")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=15, help="stage 2 passes over the data")
    length.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop each stage after this many steps instead (a trained autoencoder that is reused "
                             "keeps its length: then only stage 2's)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step, both stages")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate of stage 2 "
                        "(paper: 1e-4 to 2e-4 for much larger models)")
    parser.add_argument("--autoencoder-lr", type=positive_float, default=2e-3,
                        help="Adam learning rate of stage 1 (paper: 4.5e-6 x batch size)")
    parser.add_argument("--kl-weight", type=non_negative_float, default=1e-4,
                        help="weight of the mean KL per latent element against the mean L1 error per pixel "
                             "(paper: 1e-6 on per-image sums, below 1e-7 in these per-element units)")
    parser.add_argument("--latent-channels", type=positive_int, default=4, help="C of the latent (paper: 3 or 4)")
    parser.add_argument("--autoencoder-width", type=positive_int, default=16,
                        help="autoencoder channels at full resolution (paper: 128)")
    parser.add_argument("--width", type=positive_int, default=32, help="latent U-Net channels (paper: 128 to 256)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the sampling weights (paper: "
                        "0.9999); the warm-up (1 + step) / (10 + step) is used while it is lower: 0.999 from step 8990 on")
    # Sampling in latent space is cheap (a 7x7x4 network call per step), so the default spends steps: on the
    # default model, 256 samples scored FD 56.3 at 50 steps with eta 0, 47.6 with eta 1, 35.5 at 200 with eta 1.
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"DDIM sampling steps (default {DEFAULT_STEPS}, or the model's T if smaller), at most T")
    parser.add_argument("--timesteps", type=positive_int, default=None,
                        help=f"diffusion steps T when training (default {T}); a checkpoint keeps its own")
    parser.add_argument("--eta", type=non_negative_float, default=1.0,
                        help="DDIM's eta (lesson 04), in [0, 1]: 0 deterministic, 1 DDPM-like (better for this "
                             "small model)")
    parser.add_argument("--timestep-spacing", choices=["trailing", "leading", "linspace"], default=DEFAULT_SPACING,
                        help="which timesteps DDIM visits, named as in diffusers (lesson 04); trailing and linspace "
                             "start at T - 1, which this eps-predicting model cannot (see DEFAULT_SPACING)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--out", type=writable_dir, default=f"outputs/{LESSON}", help="output folder")
    parser.add_argument("--num-samples", type=positive_int, default=64,
                        help="images to generate (all in samples.npz; samples.png shows 64)")
    parser.add_argument("--sample-batch-size", type=positive_int, default=LATENT_SAMPLE_BATCH_SIZE,
                        help="latents per sampling batch, whatever --num-samples is "
                             "(docs/lesson04.md \"Sampling many images\")")
    parser.add_argument("--resume", action="store_true", help="continue the stage(s) from OUT's checkpoints")
    parser.add_argument("--sample-only", action="store_true", help="no training: sample from --checkpoint")
    parser.add_argument("--checkpoint", default=None, help="checkpoint for --sample-only (default OUT/checkpoint.pt)")
    parser.add_argument("--interpolate", action="store_true",
                        help="also walk between latent starting noises (slerp and lerp), decoded by latent DDIM at "
                             "--steps with eta = 0 and the decoder: interpolation.png/.gif and interpolation_grid.png")
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)  # the flags the user wrote: those a run would ignore are refused
    if args.max_steps is not None and "autoencoder_epochs" in args.given:
        parser.error("--max-steps and --autoencoder-epochs both set stage 1's length; give one of them")
    if args.checkpoint is not None and not args.sample_only:
        parser.error("--checkpoint is read only with --sample-only; to go on training, --resume reads "
                     "OUT/checkpoint.pt")
    data.check_folder_arguments(parser, args)
    if args.image_size is not None and args.image_size % 4:
        parser.error(f"--image-size must be a multiple of 4 (the autoencoder halves it twice: f = 4), "
                     f"got {args.image_size}")
    if args.eta > 1:
        parser.error(f"--eta must be at most 1, got {args.eta:g}: above 1 DDIM's sigma (Eq. 16) exceeds "
                     f"sqrt(1 - alpha_bar_prev), and Eq. 12's direction term would need the root of a negative number")
    check_timesteps(parser, args.timesteps)
    if args.steps is not None and args.steps > (args.timesteps or T) and not (args.sample_only or args.resume):
        parser.error(f"--steps must be at most T = {args.timesteps or T}, the number of training timesteps, "
                     f"got {args.steps}")
    if args.resume and args.sample_only:
        parser.error("--resume and --sample-only cannot be used together")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    for name, width in (("--width", args.width), ("--autoencoder-width", args.autoencoder_width)):
        if width % 4:
            parser.error(f"{name} must be a multiple of 4 (GroupNorm splits layers into groups of 4), got {width}")
    return args


# --- noise schedule (lesson 02's cosine schedule; only alpha_bar is needed) ---
# Timesteps are 0-based in code: t = 0 .. T-1 here is t = 1 .. T in the papers.

def make_schedule(device, timesteps=T):
    """Lesson 02's cosine schedule (Improved DDPM Eq. 17, betas clipped at 0.999): {"betas", "alphas",
    "alpha_bars"}, each [timesteps] float32 on `device` for t = 0 .. T-1. DDIM needs only alpha_bars (diffusers:
    alphas_cumprod)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((steps / timesteps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    alphas = 1 - betas
    schedule = {"betas": betas, "alphas": alphas, "alpha_bars": torch.cumprod(alphas, dim=0)}
    return {name: values.float().to(device) for name, values in schedule.items()}  # MPS has no float64


def add_noise(z0, t, eps, alpha_bars):
    """z_t ~ q(z_t | z_0) (DDPM Eq. 4), on latents: z0, eps [B, C, h, w], t [B] -> z_t."""
    alpha_bar_t = alpha_bars[t].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * z0 + (1 - alpha_bar_t).sqrt() * eps


# --- building blocks, shared by the autoencoder and the U-Net ---

def norm_groups(channels):
    """GroupNorm groups: 32 as in the paper, fewer for narrow layers so that a group has 4+ channels, and always
    a divisor of `channels` (a 144-channel layer gets 24 groups of 6), so that every width builds."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual (lesson 02): [B, C, H, W] -> same."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)
        # softmax(q^T k / sqrt(C)) v (Vaswani et al. 2017, Eq. 1)
        weights = torch.softmax((q / math.sqrt(channels)).transpose(1, 2) @ k, dim=-1)
        return x + self.out((v @ weights.transpose(1, 2)).reshape(batch, channels, height, width))


class ResBlock(nn.Module):
    """Lesson 02's residual block: [B, in, H, W] -> [B, out, H, W]. With embedding_dim = 0 it has no time
    input, as in the autoencoder; with attention it is followed by self-attention."""

    def __init__(self, in_channels, out_channels, embedding_dim=0, attention=False):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding_dim, out_channels) if embedding_dim else None
        self.norm2 = nn.GroupNorm(norm_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.attention = SelfAttention(out_channels) if attention else nn.Identity()

    def forward(self, x, embedding=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(F.silu(embedding))[:, :, None, None]  # one bias per channel from the timestep
        h = self.conv2(F.silu(self.norm2(h)))
        return self.attention(self.shortcut(x) + h)


# --- stage 1: the autoencoder ---

class Autoencoder(nn.Module):
    """A VAE with f = 4: images [B, C, H, W] -> latents [B, latent_channels, H/4, W/4] -> images.

    28x28x1 -> 7x7x4 (4x fewer numbers), 32x32x3 -> 8x8x4 (12x fewer). The encoder outputs the mean and
    log-variance of a diagonal Gaussian q(z | x) per latent element (LDM Section 3.1, "KL-reg").
    """

    def __init__(self, channels=1, width=16, latent_channels=4):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), ResBlock(width, width),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), ResBlock(2 * width, 2 * width),  # H/2
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), ResBlock(4 * width, 4 * width),  # H/4
            nn.GroupNorm(norm_groups(4 * width), 4 * width), nn.SiLU(),
            nn.Conv2d(4 * width, 2 * latent_channels, 3, padding=1))  # mean and log-variance
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 4 * width, 3, padding=1), ResBlock(4 * width, 4 * width),
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(4 * width, 2 * width, 3, padding=1),
            ResBlock(2 * width, 2 * width),  # H/2
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(2 * width, width, 3, padding=1),
            ResBlock(width, width),  # H
            nn.GroupNorm(norm_groups(width), width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def encode(self, x):
        """Images -> (mean, log-variance) of q(z | x), each [B, latent_channels, H/4, W/4]."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z):
        """Unscaled latents [B, latent_channels, H/4, W/4] -> images [B, C, H, W], about [-1, 1]."""
        return self.decoder(z)


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, in closed form (Kingma & Welling 2014,
    Appendix B): 0.5 (mean^2 + sigma^2 - 1 - log sigma^2). Same shape as mean."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar)


def autoencoder_loss(autoencoder, x, kl_weight, generator):
    """-> (loss, L1 error): the L1 error per pixel plus kl_weight x the KL per latent element, on x [B, C, H, W].

    L1, not L2: squared error punishes large errors most and is content to blur edges a little everywhere;
    the paper's autoencoders use L1 as their pixel loss (plus perceptual and adversarial terms, left out here).
    """
    mean, logvar = autoencoder.encode(x)
    # Reparameterisation (Kingma & Welling 2014, Section 2.4): z = mean + sigma * eps, differentiable in both.
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, device=x.device, generator=generator)
    l1 = (autoencoder.decode(z) - x).abs().mean()
    return l1 + kl_weight * kl_divergence(mean, logvar).mean(), l1


@torch.no_grad()
def encode_dataset(autoencoder, images, device, batch_size=500):
    """All images -> (means, standard deviations) of q(z | x), [N, latent_channels, h, w] each, on `device`."""
    means, stds = [], []
    for batch in images.split(batch_size):
        mean, logvar = autoencoder.encode(batch.to(device))
        means.append(mean)
        stds.append((0.5 * logvar).exp())
    return torch.cat(means), torch.cat(stds)


def latent_scale(means, stds, generator):
    """LDM Appendix D.1: scale latents by 1 / their standard deviation (Section 4.3.2 says why; the paper estimates
    it on its first batch, here on every training image), so that z0 has unit variance like the noise it is mixed with.
    Returns that factor as a float."""
    z = means + stds * torch.randn(means.shape, device=means.device, generator=generator)
    return 1.0 / z.std().item()


# --- loss and sampler in latent space ---

def loss_fn(model, z0, alpha_bars, generator):
    """DDPM Algorithm 1 on scaled latents z0 [B, C, h, w] (LDM Eq. 2): E ||eps - eps_theta(z_t, t)||^2."""
    t = torch.randint(0, len(alpha_bars), (z0.shape[0],), device=z0.device, generator=generator)
    eps = torch.randn(z0.shape, device=z0.device, generator=generator)
    return F.mse_loss(model(add_noise(z0, t, eps, alpha_bars), t), eps)


def timestep_sequence(steps, spacing=DEFAULT_SPACING, alpha_bars=None):
    """Lesson 04's timesteps tau_1 < ... < tau_S, named as diffusers' timestep_spacing: trailing ends at T-1, where
    z_T is pure noise (Lin et al. 2024, arXiv:2305.08891, Table 2); leading is the DDIM paper's 0, T//S, ...,
    which never starts at T-1; linspace runs from 0 to T-1. (Lesson 04 adds DDIM's quadratic and DPM-Solver's
    logsnr spacings.) T is len(alpha_bars), or the module's T without them."""
    timesteps = T if alpha_bars is None else len(alpha_bars)
    if spacing == "trailing":
        return [round(timesteps - k * timesteps / steps) - 1 for k in range(steps)][::-1]
    if spacing == "leading":
        return [i * (timesteps // steps) for i in range(steps)]
    return [round(i * (timesteps - 1) / max(1, steps - 1)) for i in range(steps)]


@torch.inference_mode()
def ddim_sample(model, alpha_bars, z_T, steps, eta=0.0, generator=None, snapshots=0, spacing=DEFAULT_SPACING):
    """Noise z_T [N, C, h, w] -> scaled latents z_0 in `steps` DDIM steps (DDIM Eq. 12 and 16, as in
    lesson 04), and about `snapshots` (a count) of the predicted z_0 along the way, as (timestep, z0_pred) pairs.

    Unlike pixels, latents have no fixed range: the predicted z_0 is not clipped.
    """
    if not 0 <= eta <= 1:  # above 1, sigma^2 exceeds 1 - alpha_bar_prev: no real direction term in Eq. 12
        raise ValueError(f"DDIM's eta must lie in [0, 1], got {eta}")
    alpha_bars_list = alpha_bars.tolist()  # Python floats: no tensor ops around the network in the loop
    taus = timestep_sequence(steps, spacing, alpha_bars)
    z_t, kept = z_T, []
    every = max(1, steps // snapshots) if snapshots else 0
    for index in tqdm(range(steps - 1, -1, -1), desc=f"DDIM {steps} steps", leave=False):
        t = taus[index]
        alpha_bar_t = alpha_bars_list[t]
        alpha_bar_prev = alpha_bars_list[taus[index - 1]] if index > 0 else 1.0
        eps_pred = model(z_t, torch.full((z_t.shape[0],), t, device=z_t.device))
        # 1. predicted z_0: DDPM Eq. 4 solved for z_0.
        z0_pred = (z_t - math.sqrt(1 - alpha_bar_t) * eps_pred) / math.sqrt(alpha_bar_t)
        # 2. DDIM Eq. 16: sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev).
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
        # 3. DDIM Eq. 12: z_prev = sqrt(alpha_bar_prev) z0_pred + sqrt(1 - alpha_bar_prev - sigma^2) eps_pred + sigma noise.
        z_t = math.sqrt(alpha_bar_prev) * z0_pred + math.sqrt(max(0.0, 1 - alpha_bar_prev - sigma ** 2)) * eps_pred
        if sigma > 0:
            z_t = z_t + sigma * torch.randn(z_t.shape, device=z_t.device, generator=generator)
        if every and index % every == 0:
            kept.append((t, z0_pred))
    return z_t, kept


# --- training: two plain loops, the autoencoder first, then the diffusion model on its latents ---

def train_autoencoder(args, images, config, device, start):
    """Stage 1 on images [N, C, H, W] (on `device`): returns the trained autoencoder in eval mode. Writes
    autoencoder.pt and autoencoder_metrics.csv (the L1 error per pixel, the number a reader can picture)."""
    torch.manual_seed(args.seed)
    autoencoder = Autoencoder(config["channels"], config["autoencoder_width"], config["latent_channels"]).to(device)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=args.autoencoder_lr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    step = 0
    if start is not None:  # --resume: every state that decides what comes next
        autoencoder.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        generator.set_state(start["generator"])
        torch.set_rng_state(start["rng"]["torch"])
        step = start["step"]
    total_steps, path = config["autoencoder_steps"], args.out / "autoencoder.pt"
    order = EpochOrder(len(images), args.batch_size, len(images) // args.batch_size, args.seed)
    log = TrainingLog(args.out / "autoencoder_metrics.csv", total_steps, step, args.batch_size, LOG_EVERY,
                      start is not None, desc="training the autoencoder")
    with StopRequest() as stop:
        while step < total_steps and not stop.requested:
            # a batch of images, and this step's learning rate
            x = images[order.batch(step).to(device)]
            lr = warmup_learning_rate(step, args.autoencoder_lr, WARMUP_STEPS)
            set_learning_rate(optimizer, lr)
            # the loss: L1 reconstruction error plus the weighted KL term
            loss, l1 = autoencoder_loss(autoencoder, x, config["kl_weight"], generator)
            check_finite(loss.item(), step, path, "autoencoder loss")
            # the update
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(autoencoder.parameters(), GRAD_CLIP)
            optimizer.step()
            step += 1
            # log, and save what --resume needs
            log.add(step, l1.item(), lr)
            if checkpoint_due(step, total_steps, CHECKPOINT_EVERY, stop.requested):
                save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": AUTOENCODER_LESSON, "config": config,
                                 "step": step, "model": autoencoder.state_dict(), "generator": generator.get_state(),
                                 "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}, path)
    log.close()
    if stop.requested:
        raise stopped_early(step, total_steps, path, " of the autoencoder")
    return autoencoder.eval()


def train_diffusion(args, latents, scale, autoencoder, config, device, start):
    """Stage 2 on the latents' (means, stds) [N, C, h, w] each: returns the EMA U-Net in eval mode. Writes
    checkpoint.pt (with the autoencoder and the scale, all that sampling needs) and metrics.csv."""
    torch.manual_seed(args.seed)
    means, stds = latents
    model = UNet(config["latent_channels"], args.width, (1, 2), means.shape[-1]).to(device)
    ema = EMA(model, args.ema_decay)
    if note := ema_decay_note(ema, config["diffusion_steps"]):
        print(note)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    step = 0
    if start is not None:  # --resume: every state that decides what comes next
        model.load_state_dict(start["model"])
        ema.model.load_state_dict(start["ema"])
        optimizer.load_state_dict(start["optimizer"])
        generator.set_state(start["generator"])
        torch.set_rng_state(start["rng"]["torch"])
        step = start["step"]
    alpha_bars = make_schedule(device, config["timesteps"])["alpha_bars"]
    total_steps, path = config["diffusion_steps"], args.out / "checkpoint.pt"
    order = EpochOrder(len(means), args.batch_size, len(means) // args.batch_size, args.seed)
    log = TrainingLog(args.out / "metrics.csv", total_steps, step, args.batch_size, LOG_EVERY, start is not None,
                      desc="training the diffusion model")
    with StopRequest() as stop:
        while step < total_steps and not stop.requested:
            # a batch of latents z0: a fresh draw from q(z | x) each time (as the paper's code does), scaled to
            # unit variance; and this step's learning rate
            batch = order.batch(step).to(device)
            noise = torch.randn(means[batch].shape, device=device, generator=generator)
            z0 = (means[batch] + stds[batch] * noise) * scale
            lr = warmup_learning_rate(step, args.lr, WARMUP_STEPS)
            set_learning_rate(optimizer, lr)
            # lesson 02's loss, on latents instead of pixels
            loss = loss_fn(model, z0, alpha_bars, generator)
            check_finite(loss.item(), step, path)
            # the update, then the EMA of the weights that sampling uses
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            ema.update(model, step)
            step += 1
            # log, and save what --resume and sampling need
            log.add(step, loss.item(), lr)
            if checkpoint_due(step, total_steps, CHECKPOINT_EVERY, stop.requested):
                save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": LESSON, "config": {**config, "scale": scale},
                                 "step": step, "model": model.state_dict(), "ema": ema.model.state_dict(),
                                 "autoencoder": autoencoder.state_dict(), "generator": generator.get_state(),
                                 "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}, path)
    log.close()
    if stop.requested:
        raise stopped_early(step, total_steps, path, " of the diffusion model")
    return ema.model


# --- figures ---

@torch.no_grad()
def write_autoencoder_figures(autoencoder, scale, shown, args, source):
    """reconstructions.png (originals above, reconstructions below) and latents.png for images `shown`."""
    mean, _ = autoencoder.encode(shown)
    reconstructions = autoencoder.decode(mean).clamp(-1, 1)
    error = (reconstructions - shown).abs().mean().item()
    print(f"autoencoder: L1 error per pixel {error:.4f} on {len(shown)} {source} images (pixels span [-1, 1])")
    columns = [str(i) for i in range(len(shown))]
    paths = [visualize.save_labeled_grid(torch.cat([shown, reconstructions]), ["original", "reconstruction"],
                                         columns, args.out / "reconstructions.png",
                                         column_title=f"{source} images; L1 error per pixel {error:.3f}")]
    # Each latent channel, scaled to unit variance, shown at the image's size (nearest) in [-3, 3] -> [-1, 1].
    latent_maps = F.interpolate(mean * scale / 3, size=shown.shape[-2:], mode="nearest")
    latent_maps = latent_maps.clamp(-1, 1).unsqueeze(2).expand(-1, -1, shown.shape[1], -1, -1)  # [B, c, C, H, W]
    grid = torch.cat([shown.unsqueeze(1), latent_maps], dim=1).flatten(0, 1)
    paths.append(visualize.save_labeled_grid(
        grid, columns, ["image", *[f"latent {c}" for c in range(mean.shape[1])]], args.out / "latents.png",
        row_title="image", column_title=f"{mean.shape[-1]}x{mean.shape[-1]} latent channels, enlarged"))
    return paths


@torch.inference_mode()
def write_samples(model, autoencoder, scale, config, args, device):
    """DDIM in latent space, then one decode: samples.png/.npz, denoising.gif/.png; returns the paths."""
    latent_shape = (config["latent_channels"], config["latent_size"], config["latent_size"])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    z_T = torch.randn((args.num_samples, *latent_shape), device=device, generator=generator)
    alpha_bars = make_schedule(device, config["timesteps"])["alpha_bars"]

    def draw(start, count):
        z0, kept = ddim_sample(model, alpha_bars, z_T[start:start + count], args.steps, args.eta, generator,
                               GIF_FRAMES, args.timestep_spacing)
        return autoencoder.decode(z0 / scale).clamp(-1, 1), kept  # undo the scale, then decode (LDM Section 3)

    started = time.perf_counter()
    images, kept = in_batches(args.num_samples, args.sample_batch_size, draw)
    print(f"sampled {args.num_samples} images in {time.perf_counter() - started:.1f} s "
          f"({args.steps} DDIM steps in latent space, eta = {args.eta:g}, {args.timestep_spacing} spacing, "
          f"one decode)")
    # What the sampler believes z_0 to be after each step, decoded: from a blur of every class to a sample.
    frames = [autoencoder.decode(z0_pred / scale).clamp(-1, 1).cpu() for _, z0_pred in kept]
    strip = list(range(0, len(kept), max(1, len(kept) // 8)))
    if strip[-1] != len(kept) - 1:
        strip.append(len(kept) - 1)
    return [visualize.save_samples_grid(images, args.out / "samples.png"),
            visualize.save_samples_npz(images, args.out / "samples.npz"),
            visualize.save_denoising_gif(frames + [images[:len(frames[0])]], args.out / "denoising.gif"),  # 1st batch
            visualize.save_denoising_strip([frames[i] for i in strip], [str(kept[i][0]) for i in strip],
                                           args.out / "denoising.png",
                                           column_title="timestep t: the predicted z_0 there, decoded")]


@torch.inference_mode()
def write_interpolation(model, autoencoder, scale, config, args, device):
    """Walks between latent starting noises z_T: DDIM with eta = 0 (deterministic, as in lesson 04), then one
    decode. interpolation.png/.gif (slerp and lerp between the same two) and interpolation_grid.png."""
    latent_shape = (config["latent_channels"], config["latent_size"], config["latent_size"])
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    corners = torch.randn((4, *latent_shape), device=device, generator=generator)
    walks = torch.stack([interpolation.row(corners[0], corners[1], INTERPOLATION_POINTS, method)
                         for method in ("slerp", "lerp")])  # [2, K, c, h, w]
    alpha_bars = make_schedule(device, config["timesteps"])["alpha_bars"]

    def decode(z_T):
        z0, _ = ddim_sample(model, alpha_bars, z_T, args.steps, 0.0, spacing=args.timestep_spacing)
        return autoencoder.decode(z0 / scale).clamp(-1, 1)

    images = decode(walks.flatten(0, 1))
    paths = interpolation.save_interpolation(images.view(2, INTERPOLATION_POINTS, *images.shape[1:]).cpu(),
                                             ["slerp", "lerp"], args.out / "interpolation.png",
                                             args.out / "interpolation.gif")
    images = decode(interpolation.grid(list(corners), INTERPOLATION_GRID))
    paths.append(interpolation.save_grid(images.cpu(), INTERPOLATION_GRID, args.out / "interpolation_grid.png"))
    return paths


# --- main ---

AUTOENCODER_KEYS = ("dataset", "image_folder", "classes", "channels", "image_size", "autoencoder_width",
                    "latent_channels", "kl_weight")


def make_config(args, dataset):
    images = dataset.images
    steps_per_epoch = data.batches_per_epoch(len(images), args.batch_size)  # refuses a batch the data cannot fill
    if images.shape[-1] % 4:
        raise LessonError(f"{dataset.name} images are {images.shape[-1]} pixels wide; f = 4 needs a multiple of 4")
    return {**data.data_config(dataset), "channels": images.shape[1], "image_size": images.shape[-1],
            "autoencoder_width": args.autoencoder_width, "latent_channels": args.latent_channels,
            "latent_size": images.shape[-1] // 4, "kl_weight": args.kl_weight, "width": args.width,
            "timesteps": args.timesteps or T,
            "autoencoder_steps": args.max_steps or args.autoencoder_epochs * steps_per_epoch,
            "diffusion_steps": args.max_steps or args.epochs * steps_per_epoch}


def stage_one(args, images, config, device):
    """Train the autoencoder, or reuse OUT/autoencoder.pt when it is finished and fits this run."""
    path = args.out / "autoencoder.pt"
    saved = load_checkpoint(path, AUTOENCODER_LESSON) if path.is_file() and args.stage != "autoencoder" else None
    if args.stage == "autoencoder" and args.resume:
        saved = load_checkpoint(path, AUTOENCODER_LESSON)
    if saved is None and args.stage == "diffusion":
        raise LessonError(f"--stage diffusion needs a trained autoencoder at {path}; run --stage autoencoder first")
    if saved is not None:
        for key in AUTOENCODER_KEYS:
            if key in config and saved["config"].get(key, config[key]) != config[key]:  # older: no classes
                raise LessonError(f"{path} was trained with {key}={saved['config'][key]}, this run has "
                                  f"{key}={config[key]}; use another --out, or delete it to train a new one")
        finished = saved["step"] >= saved["config"]["autoencoder_steps"]
        if "autoencoder_epochs" in args.given and config["autoencoder_steps"] != saved["config"]["autoencoder_steps"]:
            check_autoencoder_length(args, saved, config, path)
            finished = False  # --resume to the length asked: train_autoencoder goes on from saved["step"]
        if finished and args.stage != "autoencoder":
            refuse_unused(args, ("autoencoder_lr",), f"when {path} is trained and reused")
            print(f"reusing the trained autoencoder in {path} (step {saved['step']})")
            autoencoder = Autoencoder(config["channels"], config["autoencoder_width"], config["latent_channels"])
            autoencoder.load_state_dict(saved["model"])
            return autoencoder.to(device).eval()
        if not finished and not args.resume:
            raise LessonError(f"{path} is an unfinished autoencoder (step {saved['step']}); continue it with --resume")
    return train_autoencoder(args, images, config, device, saved)


def check_autoencoder_length(args, saved, config, path):
    """--autoencoder-epochs asks a finished or unfinished autoencoder.pt for another length than it was started with:
    LessonError (one line) unless this is a --resume that only lengthens it and no diffusion model depends on it."""
    asked, trained = config["autoencoder_steps"], saved["config"]["autoencoder_steps"]
    what = f"--autoencoder-epochs {args.autoencoder_epochs} ({asked} steps)"
    if not args.resume:
        raise LessonError(f"{path} was trained for {trained} steps, not the {what}: add --resume to continue it, "
                          f"or use another --out")
    check_resume_length(saved, asked, path)
    if (args.out / "checkpoint.pt").is_file():
        raise LessonError(f"{what}: {args.out / 'checkpoint.pt'} learned the latents of {path} as they are, and "
                          f"training the autoencoder on would leave them behind; leave --autoencoder-epochs out, or "
                          f"train both stages in another --out")


def check_same_autoencoder(start, autoencoder, path, autoencoder_path):
    """--resume of stage 2: LessonError (one line) when autoencoder.pt is no longer the autoencoder whose latents (and
    scale) the diffusion model at `path` learned, as after --stage autoencoder was run again."""
    if not same_weights(start["autoencoder"], autoencoder.state_dict()):
        raise LessonError(f"{path} learned the latents of another autoencoder than {autoencoder_path} (trained again "
                          f"since?): its scale and latents would not fit; train stage 2 afresh (leave --resume out) "
                          f"or use another --out")


def diffusion_start(args, autoencoder, config):
    """The stage 2 checkpoint --resume continues (None for a fresh stage 2), checked against this run before anything
    is written: the same data, network and autoencoder, a longer length, and --steps within its T (set in config)."""
    path = args.out / "checkpoint.pt"
    # --stage all --resume after an interrupted stage 1 finds no checkpoint.pt yet: stage 2 starts afresh.
    start = load_checkpoint(path, LESSON) if args.resume and (path.is_file() or args.stage == "diffusion") else None
    if start is not None:
        config["timesteps"] = saved_timesteps(start["config"], args.timesteps, path)
        require_same(start["config"], config, (*data.data_keys(config), "latent_channels", "autoencoder_width", "width"),
                     path)
        check_same_autoencoder(start, autoencoder, path, args.out / "autoencoder.pt")
        check_resume_length(start, config["diffusion_steps"], path)
    check_steps(args.steps, config["timesteps"], path)
    return start


def stage_two(args, autoencoder, latents, scale, config, device, start):
    """Train the latent U-Net on the latents' (means, stds), or continue `start` (diffusion_start's checkpoint):
    -> (EMA U-Net, scale)."""
    if start is not None:
        scale = start["config"]["scale"]  # the scale the model was trained with, not a new measurement
    return train_diffusion(args, latents, scale, autoencoder, config, device, start), scale


def load_for_sampling(path, device, timesteps=None):
    """checkpoint.pt -> (EMA U-Net, autoencoder, scale, config), all in eval mode; `timesteps` is --timesteps."""
    checkpoint = load_checkpoint(path, LESSON)
    config = checkpoint["config"]
    config["timesteps"] = saved_timesteps(config, timesteps, path)
    model = UNet(config["latent_channels"], config["width"], (1, 2), config["latent_size"])
    model.load_state_dict(checkpoint["ema"])
    autoencoder = Autoencoder(config["channels"], config["autoencoder_width"], config["latent_channels"])
    autoencoder.load_state_dict(checkpoint["autoencoder"])
    return model.to(device).eval(), autoencoder.to(device).eval(), config["scale"], config


def shown_images(dataset_name, data_dir, fallback):
    """SHOWN_IMAGES test images for the autoencoder figures (never trained on), else training images."""
    if dataset_name not in data.DATASETS:  # an image folder has no test split
        return fallback[:SHOWN_IMAGES], "training"
    try:
        return data.load_dataset(dataset_name, data_dir, "test", download=False).images[:SHOWN_IMAGES], "test"
    except data.DataUnavailable:
        return fallback[:SHOWN_IMAGES], "training"


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    make_out_dir(args.out)
    if args.sample_only:
        path = args.checkpoint or args.out / "checkpoint.pt"
        model, autoencoder, scale, config = load_for_sampling(path, device, args.timesteps)
        data.check_sample_settings(config, args, path)
        refuse_unused(args, ("stage", "autoencoder_epochs", "epochs", "max_steps", "batch_size", "lr", "autoencoder_lr",
                             "ema_decay"), "with --sample-only: it trains nothing")
        refuse_different(args, config, ("latent_channels", "autoencoder_width", "width", "kl_weight"), path)
        check_steps(args.steps, config["timesteps"], path)
        args.steps = args.steps or min(DEFAULT_STEPS, config["timesteps"])
        paths = write_samples(model, autoencoder, scale, config, args, device)
        if args.interpolate:
            paths += write_interpolation(model, autoencoder, scale, config, args, device)
        for path in paths:
            print(f"wrote {path}")
        return
    if args.stage == "autoencoder":
        refuse_unused(args, ("epochs", "lr", "width", "ema_decay", "steps", "timesteps", "eta", "timestep_spacing",
                             "num_samples", "sample_batch_size", "interpolate"),
                      "with --stage autoencoder: it trains and draws no diffusion model")
    saved = args.out / "autoencoder.pt"  # --resume: its image size and channels are checked before reading a folder
    saved = load_checkpoint(saved, AUTOENCODER_LESSON)["config"] if args.resume and saved.is_file() else None
    dataset = data.load_training_data(args, saved)
    config = make_config(args, dataset)
    images = dataset.images.to(device)
    if args.resume and not any((args.out / name).is_file() for name in ("autoencoder.pt", "checkpoint.pt")):
        raise LessonError(f"--resume: no checkpoint in {args.out} to continue from")
    autoencoder = stage_one(args, images, config, device)
    start = diffusion_start(args, autoencoder, config) if args.stage != "autoencoder" else None
    latents = encode_dataset(autoencoder, images, device)
    scale = latent_scale(*latents, torch.Generator(device=device).manual_seed(args.seed))
    print(f"latents: {tuple(latents[0].shape[1:])} per image; scale factor {scale:.4f} (1 / their standard "
          f"deviation), so that the diffusion model sees unit-variance latents")
    shown, source = shown_images(dataset.name, args.data_dir, dataset.images)
    paths = [args.out / "autoencoder.pt", *write_autoencoder_figures(autoencoder, scale, shown.to(device), args, source)]
    if (args.out / "autoencoder_metrics.csv").is_file():
        paths += [args.out / "autoencoder_metrics.csv", visualize.save_loss_curve(
            args.out / "autoencoder_metrics.csv", args.out / "autoencoder_loss.png", "L1 reconstruction error per pixel")]
    if args.stage != "autoencoder":
        model, scale = stage_two(args, autoencoder, latents, scale, config, device, start)
        args.steps = args.steps or min(DEFAULT_STEPS, config["timesteps"])  # T is known now, also on --resume
        paths += [args.out / "checkpoint.pt", args.out / "metrics.csv",
                  visualize.save_loss_curve(args.out / "metrics.csv", args.out / "loss.png"),
                  *write_samples(model, autoencoder, scale, config, args, device)]
        if args.interpolate:
            paths += write_interpolation(model, autoencoder, scale, config, args, device)
    for path in paths:
        print(f"wrote {path}")


# ====================================================================================================
# Lesson 02's U-Net and EMA, resized for 7x7 latents (two resolutions, attention at each) and built from the
# blocks above. What lesson 05 teaches is above; read lesson 02 for what follows.
# ====================================================================================================

# --- stage 2's network: lesson 02's U-Net for small latents ---

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps t [B] -> [B, dim] (Vaswani et al. 2017, Sec. 3.5)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class UNet(nn.Module):
    """eps_pred = model(z_t, t): [B, C, h, w] and [B] -> [B, C, h, w], two resolutions (7x7 and 4x4 for
    7x7 latents), one ResBlock each way per resolution, attention at every resolution of 16 or less.

    Upsampling goes to the size of the matching skip, so odd sizes such as 7 work (7 -> 4 -> 7).
    """

    def __init__(self, channels=4, width=32, channel_mults=(1, 2), size=7):
        super().__init__()
        self.width = width
        embedding_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        sizes = [math.ceil(size / 2 ** level) for level in range(len(channel_mults))]
        widths = [width * mult for mult in channel_mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        current = width
        for level, (level_size, level_width) in enumerate(zip(sizes, widths)):
            self.down.append(ResBlock(current, level_width, embedding_dim, level_size <= ATTENTION_MAX_SIZE))
            current = level_width
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
        self.middle = ResBlock(current, current, embedding_dim, attention=True)
        self.up = nn.ModuleList()
        for level_size, level_width in reversed(list(zip(sizes, widths))):
            self.up.append(ResBlock(current + level_width, level_width, embedding_dim,
                                    level_size <= ATTENTION_MAX_SIZE))
            current = level_width
        self.head = nn.Sequential(nn.GroupNorm(norm_groups(current), current), nn.SiLU(),
                                  nn.Conv2d(current, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # as in lesson 02: the network starts by predicting 0
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, z_t, t):
        embedding = self.time_mlp(timestep_embedding(t, self.width))
        h = self.stem(z_t)
        skips = []
        for level, block in enumerate(self.down):
            h = block(h, embedding)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.middle(h, embedding)
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")  # 4x4 -> 7x7: nearest, as lesson 02
            h = block(torch.cat([h, skip], dim=1), embedding)
        return self.head(h)


class EMA:
    """Exponential moving average of the weights (lesson 02): the weights used for sampling."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step):
        """Lesson 02's warm-up: at step n the decay is (1 + n) / (10 + n), an average over about the last ninth of the
        steps so far, so the random start is forgotten fast."""
        return min(self.decay, (1 + step) / (EMA_WARMUP + step))

    @torch.no_grad()
    def update(self, model, step):
        decay = self.decay_at(step)
        for average, value in zip(self.model.parameters(), model.parameters()):
            average.lerp_(value, 1 - decay)


if __name__ == "__main__":
    run(main)
