"""Lesson 03: class-conditional DDPM with classifier-free guidance.

Paper: Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv:2207.12598.
Builds on: lesson 02 (the U-Net, cosine schedule, posterior sampler, EMA, AdamW with warm-up).
New here:
  - a class embedding added to the time embedding, with a learned "no class" token;
  - label dropout, so that one network learns both p(x | c) and p(x);
  - guided sampling eps = (1 + w) eps(x, c) - w eps(x), both predictions in one doubled batch.
Left out: several GPUs and mixed precision (see lesson 02); fast sampling (04); latent space (05).

CPU:  python 03_conditional_ddpm.py    about 25-45 min on 2 cores (python GETTING_STARTED.py predicts yours)
GPU:  python 03_conditional_ddpm.py --device cuda --epochs 15 --width 32    3.9 min on one H100
Writes to outputs/03_conditional_ddpm/: checkpoint.pt, samples.png (one row per class), samples.npz
(images and labels), guidance.png (rows: w, columns: classes), denoising.gif, denoising.png, loss.png,
metrics.csv.
"""
import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import data, visualize
from utils.runtime import (
    CHECKPOINT_FORMAT, SAMPLE_BATCH_SIZE, ArgumentParser, EpochOrder, LessonError, StopRequest, TrainingLog,
    check_finite, check_resume_length, check_timesteps, checkpoint_due, ema_decay_note, given_flags, in_batches,
    load_checkpoint, make_out_dir, non_negative_float, pick_device, positive_float, positive_int, refuse_different,
    refuse_unused, require_same, run, save_checkpoint, saved_timesteps, set_learning_rate, stopped_early,
    warmup_learning_rate, writable_dir)

LESSON = "03_conditional_ddpm"
T = 1000  # number of diffusion steps (the default of --timesteps)
COSINE_OFFSET = 0.008  # Improved DDPM Section 3.2: s
MAX_BETA = 0.999  # Improved DDPM Section 3.2: betas clipped at 0.999
NUM_CLASSES = 10  # every built-in dataset has ten classes; a folder of pictures has one per subfolder
ATTENTION_LEVEL = 1  # self-attention at the second resolution (14x14 for MNIST, 16x16 for CIFAR-10)
EMA_WARMUP = 10  # EMA decay rises as (1 + step) / (10 + step) towards --ema-decay
# w of samples.png. At 250 samples per w on the default run's model, w = 1 was as close to the data as no guidance
# (FD 22.1; 27.8 at w = 0, 39.9 at w = 2) with 97.2% of samples of the class asked for (81.2% at w = 0, 99.2% at
# w = 2): docs/lesson03.md "How strong should guidance be?".
GUIDANCE_WEIGHT = 1.0
SWEEP_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)  # guidance strengths w in guidance.png, one row each
LOG_EVERY = 50  # steps between rows of metrics.csv
GRAD_CLIP = 1.0  # largest gradient norm, as in lesson 02 (DDPM's released code)
GIF_FRAMES = 40  # snapshots of the reverse process kept for denoising.gif
ARCHITECTURE_KEYS = ("channels", "image_size", "width", "channel_mults", "num_res_blocks", "num_classes")


# --- arguments ---

def channel_mults(text):
    """argparse type: '1,2,4' -> (1, 2, 4), one multiplier of --width per resolution."""
    try:
        mults = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if len(mults) < 2 or min(mults) < 1:
        raise argparse.ArgumentTypeError(f"need at least two multipliers, each at least 1, got {text!r}")
    return mults


def parse_args(argv=None):
    parser = ArgumentParser(description="Lesson 03: train a class-conditional DDPM, then sample with guidance.")
    parser.add_argument("--dataset", type=data.dataset_or_folder, default=None,
                        help=data.DATASET_HELP + "; default: mnist, or another one found here when mnist is not")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    data.add_folder_arguments(parser)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=4, help="passes over the training set")
    length.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps instead")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate after warm-up "
                        "(DDPM: 2e-4; a small model in a short run learns faster at 1e-3)")
    parser.add_argument("--warmup-steps", type=int, default=200, help="steps of linear learning-rate warm-up")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the sampling weights "
                        "(DDPM: 0.9999); the warm-up (1 + step) / (10 + step) is used while it is lower: 0.999 from "
                        "step 8990 on")
    parser.add_argument("--p-uncond", type=float, default=0.1,
                        help="probability of dropping a label during training (paper: 0.1 or 0.2)")
    guidance = parser.add_mutually_exclusive_group()
    guidance.add_argument("--guidance-weight", type=non_negative_float, default=None,
                          help=f"guidance strength w >= 0 of Ho & Salimans Eq. 6 (default {GUIDANCE_WEIGHT:g}); "
                               "w = 0 is plain conditional sampling")
    guidance.add_argument("--guidance-scale", type=positive_float, default=None,
                          help="the same strength in diffusers' convention, guidance_scale = 1 + w (so 7.5 there is "
                               "w = 6.5 here); at least 1")
    parser.add_argument("--class-label", type=int, default=None,
                        help=f"sample only this class (0..{NUM_CLASSES - 1}, or an image folder's class number in the "
                             "order of its sorted subfolder names); default: every class in turn (one row per class "
                             "when --num-samples is a multiple of the number of classes)")
    parser.add_argument("--timesteps", type=positive_int, default=None,
                        help=f"diffusion steps T (default {T}): the cosine schedule drawn over T steps; a checkpoint "
                             f"keeps its own T")
    parser.add_argument("--width", type=positive_int, default=16, help="channels at full resolution (DDPM's released code: 128)")
    parser.add_argument("--channel-mults", type=channel_mults, default=(1, 2, 4), help="width multiplier per resolution")
    parser.add_argument("--num-res-blocks", type=positive_int, default=1, help="ResNet blocks per resolution")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout in ResNet blocks (DDPM: 0.1 on CIFAR-10)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="random seed for data order, noise and sampling")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--out", type=writable_dir, default=f"outputs/{LESSON}", help="output folder")
    parser.add_argument("--num-samples", type=positive_int, default=60,
                        help="images to generate at the end, split evenly over the classes (all in samples.npz; "
                             "samples.png: one row per class, at most 64 images)")
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
    # The number of classes is known here for a built-in dataset; an image folder's or a checkpoint's is checked
    # once it is read.
    built_in = args.image_folder is None and not args.sample_only  # (check_folder_arguments set image_folder)
    if args.class_label is not None and (args.class_label < 0 or built_in and args.class_label >= NUM_CLASSES):
        parser.error(f"--class-label must be between 0 and {NUM_CLASSES - 1}, got {args.class_label}")
    if args.guidance_scale is not None and args.guidance_scale < 1.0:
        parser.error(f"--guidance-scale is diffusers' 1 + w and must be at least 1, got {args.guidance_scale:g}")
    if args.guidance_weight is None:
        args.guidance_weight = GUIDANCE_WEIGHT if args.guidance_scale is None else args.guidance_scale - 1.0
    if not 0.0 <= args.p_uncond < 1.0:
        parser.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps cannot be negative")
    check_timesteps(parser, args.timesteps)
    return args


# --- noise schedule (lesson 02's cosine schedule) ---
# Timesteps are 0-based in code: t = 0 .. T-1 here is t = 1 .. T in the papers.

def make_schedule(device, timesteps=T):
    """Per-step constants of the forward process and the posterior, each [timesteps], float32 on `device`."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    # Improved DDPM Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(pi/2 * (t/T + s) / (1 + s)).
    f = torch.cos((steps / timesteps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)  # Improved DDPM Section 3.2
    alphas = 1 - betas
    alpha_bars = torch.cumprod(alphas, dim=0)  # alpha_bar_t = prod_{s<=t} alpha_s (diffusers: alphas_cumprod)
    alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    schedule = {
        "betas": betas, "alpha_bars": alpha_bars,
        # DDPM Eqs. 6-7: q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde_t I), mean and variance from Eq. 7.
        "posterior_x0_weights": alpha_bars_prev.sqrt() * betas / (1 - alpha_bars),
        "posterior_xt_weights": alphas.sqrt() * (1 - alpha_bars_prev) / (1 - alpha_bars),
        "posterior_variances": (1 - alpha_bars_prev) / (1 - alpha_bars) * betas,
    }
    return {key: values.float().to(device) for key, values in schedule.items()}


def add_noise(x0, t, eps, schedule):
    """Sample x_t ~ q(x_t | x_0) (DDPM Eq. 4): x0, eps [B, C, H, W], t [B] -> x_t [B, C, H, W]."""
    alpha_bar_t = schedule["alpha_bars"][t].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


# --- model: lesson 02's U-Net, told which class to draw ---

class ConditionalUNet(nn.Module):
    """eps_pred = model(x_t, t, labels): [B, C, H, W], [B], [B] -> [B, C, H, W].

    labels are 0 .. num_classes - 1, or num_classes (`null_class`) for "no class": the unconditional model.
    """

    def __init__(self, channels=1, width=16, channel_mults=(1, 2, 4), num_res_blocks=1, dropout=0.0,
                 num_classes=NUM_CLASSES):
        super().__init__()
        self.width, self.null_class = width, num_classes
        embedding_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        # One learned vector per class, added to the time embedding so that the class reaches every ResNet
        # block the way the timestep does (as in guided-diffusion's released code, Dhariwal & Nichol 2021),
        # plus one more for Ho & Salimans' null token (Section 3.2): "no class", for the unconditional model.
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim)
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
            if level < len(channel_mults) - 1:
                downsample = nn.Conv2d(current, current, 3, stride=2, padding=1)
                skip_channels.append(current)
            self.down.append(Level(blocks, downsample))
        self.middle = nn.ModuleList([ResBlock(current, current, embedding_dim, dropout, attention=True),
                                     ResBlock(current, current, embedding_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(current + skip_channels.pop(), width * mult, embedding_dim, dropout,
                                       level == ATTENTION_LEVEL))
                current = width * mult
            upsample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                     nn.Conv2d(current, current, 3, padding=1))
            self.up.append(Level(blocks, upsample if level > 0 else None))
        self.head = nn.Sequential(nn.GroupNorm(norm_groups(current), current), nn.SiLU(),
                                  nn.Conv2d(current, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x_t, t, labels):
        embedding = self.time_mlp(timestep_embedding(t, self.width)) + self.class_embedding(labels)
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
    """The network a checkpoint's config describes."""
    return ConditionalUNet(config["channels"], config["width"], tuple(config["channel_mults"]),
                           config["num_res_blocks"], config.get("dropout", 0.0), config["num_classes"])


# --- loss ---

def drop_labels(labels, p_uncond, null_class, generator):
    """Replace each label by the null class with probability p_uncond (Ho & Salimans Algorithm 1, line 3)."""
    dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < p_uncond
    return torch.where(dropped, torch.full_like(labels, null_class), labels)


def loss_fn(model, x0, labels, schedule, generator, p_uncond):
    """Ho & Salimans Algorithm 1 on a batch x0 [B, C, H, W] with labels [B]: one scalar loss.

    Dropping labels trains the unconditional model eps(x_t) inside the conditional one, for free.
    """
    labels = drop_labels(labels, p_uncond, model.null_class, generator)
    timesteps = len(schedule["betas"])  # T
    t = torch.randint(0, timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    # DDPM's simple loss (Eq. 14), now with the (sometimes dropped) class as an extra input.
    return F.mse_loss(model(add_noise(x0, t, eps, schedule), t, labels), eps)


# --- sampler ---

def guided_eps(model, x_t, t, labels, w):
    """The guided noise prediction for x_t [N, C, H, W] at timesteps t [N] for classes labels [N].

    w is one guidance strength for the batch, or a tensor [N] of one per image.
    """
    if not torch.is_tensor(w) and w == 0:
        return model(x_t, t, labels)  # w = 0 is the conditional model alone: skip the second half
    w = torch.as_tensor(w, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1, 1, 1)
    null = torch.full_like(labels, model.null_class)
    # Conditional and unconditional predictions in one forward pass of a doubled batch [2N, ...]:
    # one large batch keeps the CPU's cores busier than two small ones.
    eps_cond, eps_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
    # Ho & Salimans Eq. 6: eps = (1 + w) eps(x_t, c) - w eps(x_t): push away from the unconditional
    # prediction, towards what makes the image more typical of class c. diffusers writes the same as
    # eps_uncond + guidance_scale (eps_cond - eps_uncond), with guidance_scale = 1 + w.
    return (1 + w) * eps_cond - w * eps_uncond


def sampling_constants(schedule):
    """The posterior's per-step values as lists of Python floats ({"alpha_bars", "posterior_x0_weights",
    "posterior_xt_weights", "sigmas"}): in the sampling loop, floats cost no tensor ops."""
    names = ("alpha_bars", "posterior_x0_weights", "posterior_xt_weights")
    constants = {name: schedule[name].tolist() for name in names}
    constants["sigmas"] = schedule["posterior_variances"].sqrt().tolist()  # sigma_t^2 = beta_tilde_t
    return constants


def sample_step(model, x_t, t, labels, w, constants, generator):
    """One guided reverse step (lesson 02's posterior step): x_t [N, C, H, W] at timestep t -> x_{t-1}."""
    eps_pred = guided_eps(model, x_t, torch.full((x_t.shape[0],), t, device=x_t.device), labels, w)
    alpha_bar_t = constants["alpha_bars"][t]
    # 1. DDPM Eq. 4 solved for x_0, clipped to the data range as in DDPM's code.
    x0_pred = ((x_t - math.sqrt(1 - alpha_bar_t) * eps_pred) / math.sqrt(alpha_bar_t)).clamp(-1, 1)
    # 2. DDPM Eq. 7: the mean of q(x_{t-1} | x_t, x_0 = x0_pred).
    mean = constants["posterior_x0_weights"][t] * x0_pred + constants["posterior_xt_weights"][t] * x_t
    if t == 0:
        return mean
    # 3. Add noise with the posterior's variance beta_tilde_t.
    noise = torch.randn(x_t.shape, device=x_t.device, generator=generator)
    return mean + constants["sigmas"][t] * noise


@torch.inference_mode()
def sample(model, schedule, labels, w, x_T, generator, keep=()):
    """Images of classes labels [N] from the starting noise x_T [N, C, H, W] at guidance w (a float, or
    a tensor [N]): T reverse steps -> images in [-1, 1], and {t: x_t} for t in `keep`."""
    constants = sampling_constants(schedule)  # so that the loop spends its time in the network
    x_t, kept = x_T, {}
    for t in tqdm(range(len(constants["sigmas"]) - 1, -1, -1), desc="sampling", leave=False):
        x_t = sample_step(model, x_t, t, labels, w, constants, generator)
        if t in keep:
            kept[t] = x_t.clamp(-1, 1).cpu()
    return x_t.clamp(-1, 1), kept


# --- training ---

def make_state(model, ema, optimizer, step, generator, config):
    """Everything --resume needs to continue exactly where training stopped."""
    return {"format": CHECKPOINT_FORMAT, "lesson": LESSON, "config": config, "step": step,
            "epoch": step // config["steps_per_epoch"], "model": model.state_dict(), "ema": ema.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}


def train(args, model, ema, dataset, schedule, config, device, start=None):
    """Train on dataset.images [N, C, H, W] and dataset.labels [N] (on `device`); writes checkpoint.pt, metrics.csv."""
    images, labels = dataset.images, dataset.labels
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    step = 0
    if start is not None:  # --resume: every state that decides what comes next
        model.load_state_dict(start["model"])
        ema.model.load_state_dict(start["ema"])
        optimizer.load_state_dict(start["optimizer"])
        generator.set_state(start["rng"]["generator"])
        torch.set_rng_state(start["rng"]["torch"])
        if start["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(start["rng"]["cuda"])  # dropout on a GPU draws from it
        step = start["step"]
    total_steps, checkpoint_path = config["total_steps"], args.out / "checkpoint.pt"
    order = EpochOrder(len(images), args.batch_size, config["steps_per_epoch"], args.seed)
    log = TrainingLog(args.out / "metrics.csv", total_steps, step, args.batch_size, LOG_EVERY, start is not None)
    model.train()
    with StopRequest() as stop:
        while step < total_steps and not stop.requested:
            # a batch of clean images x0 with their classes, and this step's learning rate
            batch = order.batch(step).to(device)
            lr = warmup_learning_rate(step, args.lr, args.warmup_steps)
            set_learning_rate(optimizer, lr)
            # the loss: lesson 02's, with each label dropped to the null class with probability p_uncond
            loss = loss_fn(model, images[batch], labels[batch], schedule, generator, args.p_uncond)
            check_finite(loss.item(), step, checkpoint_path)
            # the update (gradient norm clipped as in lesson 02), then the EMA of the weights that sampling uses
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            ema.update(model, step)
            step += 1
            # log, and save what --resume needs
            log.add(step, loss.item(), lr)
            if checkpoint_due(step, total_steps, args.checkpoint_every, stop.requested):
                save_checkpoint(make_state(model, ema, optimizer, step, generator, config), checkpoint_path)
    log.close()
    if stop.requested:
        raise stopped_early(step, total_steps, checkpoint_path)


# --- main ---

def sample_labels(args, num_classes, device):
    """--num-samples labels [N]: all --class-label, or the classes in order, split evenly: each of K classes gets
    floor(N / K) or ceil(N / K) samples (21 samples of 10 classes: 3 of class 0, 2 of each other class)."""
    if args.class_label is not None:
        if args.class_label >= num_classes:
            raise LessonError(f"--class-label must be between 0 and {num_classes - 1}, got {args.class_label}")
        return torch.full((args.num_samples,), args.class_label, device=device)
    return torch.arange(args.num_samples, device=device) * num_classes // args.num_samples


def write_samples(model, schedule, config, args, device):
    """Sample at --guidance-weight (samples.png/.npz, denoising.gif/.png) and the guidance sweep; return paths."""
    shape = (config["channels"], config["image_size"], config["image_size"])
    num_classes = config["num_classes"]
    labels = sample_labels(args, num_classes, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x_T = torch.randn((len(labels), *shape), device=device, generator=generator)
    timesteps = len(schedule["betas"])
    gif_steps, strip_steps = visualize.gif_steps(timesteps, GIF_FRAMES), visualize.strip_steps(timesteps)
    started = time.perf_counter()
    images, kept = in_batches(len(labels), args.sample_batch_size, lambda start, count: sample(
        model, schedule, labels[start:start + count], args.guidance_weight, x_T[start:start + count], generator,
        keep={*gif_steps, *strip_steps}))
    print(f"sampled {len(labels)} images at w={args.guidance_weight:g} in {time.perf_counter() - started:.1f} s")
    paths = [
        visualize.save_samples_grid(images, args.out / "samples.png", labels=labels),
        visualize.save_samples_npz(images, args.out / "samples.npz", labels=labels),
        visualize.save_denoising_gif([kept[t] for t in gif_steps], args.out / "denoising.gif"),
        visualize.save_denoising_strip([kept[t] for t in strip_steps], strip_steps, args.out / "denoising.png"),
    ]
    # The sweep, in one batch: a row of one image per class for each w, every row from the same
    # starting noise, so that the rows differ only by w (and the noise added along the way).
    classes = torch.arange(num_classes, device=device).repeat(len(SWEEP_WEIGHTS))
    weights = torch.tensor(SWEEP_WEIGHTS, device=device).repeat_interleave(num_classes)
    x_T = torch.randn((num_classes, *shape), device=device, generator=generator).repeat(len(SWEEP_WEIGHTS), 1, 1, 1)
    started = time.perf_counter()
    sweep, _ = sample(model, schedule, classes, weights, x_T, generator)
    print(f"sampled the guidance sweep ({len(classes)} images) in {time.perf_counter() - started:.1f} s")
    names = config.get("classes") or data.DATASETS[config["dataset"]].classes  # checkpoints before folders: built-in
    paths.append(visualize.save_labeled_grid(sweep, [f"w = {w:g}" for w in SWEEP_WEIGHTS], list(names),
                                             args.out / "guidance.png", row_title="guidance strength",
                                             column_title="class"))
    return paths


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    make_out_dir(args.out)
    if args.sample_only:
        path = args.checkpoint or args.out / "checkpoint.pt"
        checkpoint = with_current_names(load_checkpoint(path, LESSON))
        config = checkpoint["config"]
        data.check_sample_settings(config, args, path)
        refuse_unused(args, ("epochs", "max_steps", "batch_size", "lr", "warmup_steps", "ema_decay", "p_uncond",
                             "checkpoint_every"), "with --sample-only: it trains nothing")
        refuse_different(args, config, ("width", "channel_mults", "num_res_blocks", "dropout"), path)
        schedule = make_schedule(device, saved_timesteps(config, args.timesteps, path))
        model = build_model(config).to(device)
        model.load_state_dict(checkpoint["ema"])
        for path in write_samples(model.eval(), schedule, config, args, device):
            print(f"wrote {path}")
        return
    start = with_current_names(load_checkpoint(args.out / "checkpoint.pt", LESSON)) if args.resume else None
    if args.image_folder is not None and not data.folder_files(args.image_folder)[1]:
        raise LessonError(f"lesson 03 learns classes, and the folder {args.image_folder} has none: put each class's "
                          f"images in a subfolder named after it")
    dataset = data.load_training_data(args, start and start["config"])
    if args.class_label is not None and args.class_label >= len(dataset.classes):
        raise LessonError(f"--class-label must be between 0 and {len(dataset.classes) - 1}, got {args.class_label}")
    dataset.images, dataset.labels = dataset.images.to(device), dataset.labels.to(device)
    size = dataset.images.shape[-1]
    data.check_unet_fits(dataset, args.channel_mults)  # the same refusal in every copy of the U-Net
    steps_per_epoch = data.batches_per_epoch(len(dataset.images), args.batch_size)  # refuses a batch too big
    config = {**data.data_config(dataset), "channels": dataset.images.shape[1], "image_size": size, "width": args.width,
              "channel_mults": list(args.channel_mults), "num_res_blocks": args.num_res_blocks,
              "dropout": args.dropout, "num_classes": len(dataset.classes), "p_uncond": args.p_uncond,
              "timesteps": saved_timesteps(start["config"], args.timesteps, args.out / "checkpoint.pt") if start
              else args.timesteps or T,
              "batch_size": args.batch_size, "seed": args.seed, "steps_per_epoch": steps_per_epoch,
              "total_steps": args.max_steps or args.epochs * steps_per_epoch}
    if start is not None:
        require_same(start["config"], config, ARCHITECTURE_KEYS + data.data_keys(config) + ("batch_size", "seed", "p_uncond"),
                     args.out / "checkpoint.pt")
        check_resume_length(start, config["total_steps"], args.out / "checkpoint.pt")
    model = build_model(config).to(device)
    ema = EMA(model, args.ema_decay)
    schedule = make_schedule(device, config["timesteps"])
    print(f"{dataset.name}: {len(dataset.images)} images {tuple(dataset.images.shape[1:])} from {dataset.source}; "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}; "
          f"{config['total_steps']} steps of {args.batch_size}; labels dropped with p = {args.p_uncond}")
    if note := ema_decay_note(ema, config["total_steps"]):
        print(note)
    train(args, model, ema, dataset, schedule, config, device, start)
    paths = [args.out / "checkpoint.pt", args.out / "metrics.csv",
             visualize.save_loss_curve(args.out / "metrics.csv", args.out / "loss.png")]
    paths += write_samples(ema.model, schedule, config, args, device)
    for path in paths:
        print(f"wrote {path}")


def with_current_names(checkpoint):
    """Checkpoints saved before 2026-11-30 named each ResBlock's time layer `embedding`; it is `time` now, as in
    lesson 02. Renames those weights in place (nothing else changed), so that older checkpoints load."""
    if checkpoint is not None:
        for key in ("model", "ema"):
            checkpoint[key] = {name.replace(".embedding.", ".time."): value for name, value in checkpoint[key].items()}
    return checkpoint


# ====================================================================================================
# Lesson 02's building blocks and EMA, unchanged; ConditionalUNet above assembles them. What lesson 03
# teaches is above; read lesson 02 for what follows.
# ====================================================================================================

# --- lesson 02's U-Net blocks and EMA ---

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


class EMA:
    """Exponential moving average of the weights (DDPM Appendix B): the weights used for sampling.

    The average is smoother than the weights of any one step, which jump around with the gradient noise.
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step):
        """Warm-up: at step n the decay is (1 + n) / (10 + n), an average over about the last ninth of the
        steps so far, so the random start is forgotten fast."""
        return min(self.decay, (1 + step) / (EMA_WARMUP + step))

    @torch.no_grad()
    def update(self, model, step):
        decay = self.decay_at(step)
        for average, value in zip(self.model.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(value, 1 - decay)  # average = decay * average + (1 - decay) * value
            else:
                average.copy_(value)


if __name__ == "__main__":
    run(main)
