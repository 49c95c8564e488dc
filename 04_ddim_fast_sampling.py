"""Lesson 04: DDIM, fast and deterministic sampling from a DDPM without retraining, and second-order solvers.

Papers: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", 2021, arXiv:2010.02502;
        Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++", 2022, arXiv:2211.01095;
        Lin, Liu, Li & Yang, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2024, arXiv:2305.08891;
        Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative Models", 2022,
        arXiv:2206.00364 (Heun, Algorithm 1); Esser et al. 2024, arXiv:2403.03206 (SD3: flow matching, Euler).
Builds on: lesson 02 (its network and checkpoints are used as they are: eps, v or flow).
New here:
  - the DDIM update (Eq. 12) on a sub-sequence of the timesteps that starts at T - 1 ("trailing"):
    10-50 steps instead of 1000; eta, the noise knob of Eq. 16; DDIM inversion (Eq. 12 run backwards);
  - DPM-Solver++(2M): the same update with x0_pred extrapolated from the last two steps, in log-SNR time,
    on timesteps equally spaced in log-SNR;
  - samplers as ODE solvers: every point x_t of the schedule has a twin on the straight path (1 - s) x0 + s eps,
    where the ODE is dx/ds = eps - x0. Euler on it is DDIM's eta = 0 step exactly, for every target; Heun adds
    a second evaluation at the step's end (two network calls per step). One conversion, predict_eps_and_x0,
    turns what any model predicts (eps, v or flow's velocity) into eps_pred and x0_pred for every sampler.
Left out: class guidance (lesson 03); latent space (05).

CPU:  python 04_ddim_fast_sampling.py --checkpoint outputs/02_ddpm/checkpoint.pt    about 1-2 min on 2 cores, after
      lesson 02 (python GETTING_STARTED.py predicts yours)
GPU:  python 04_ddim_fast_sampling.py --checkpoint outputs/02_ddpm/checkpoint.pt --device cuda    (not timed yet)
Compare with DDPM, timed and scored: python examples/compare_methods.py
(docs/lesson04.md "DDIM and DPM-Solver++ against DDPM on one model").
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
    CHECKPOINT_FORMAT, SAMPLE_BATCH_SIZE, ArgumentParser, EpochOrder, StopRequest, TrainingLog, check_finite,
    check_resume_length, check_steps, check_timesteps, checkpoint_due, given_flags, in_batches, load_checkpoint,
    make_out_dir, non_negative_float, pick_device, positive_float, positive_int, refuse_different, refuse_unused,
    require_same, run, save_checkpoint, saved_timesteps, set_learning_rate, stopped_early, warmup_learning_rate,
    writable_dir)

LESSON = "04_ddim_fast_sampling"
T = 1000  # training timesteps, as in lesson 02 (a checkpoint's own T, its --timesteps, takes precedence)
BETA_START, BETA_END = 1e-4, 0.02  # DDPM's linear schedule (lesson 02)
COSINE_OFFSET, MAX_BETA = 0.008, 0.999  # Improved DDPM's cosine schedule (lesson 02)
ATTENTION_LEVEL = 1  # as in lesson 02: the network must match lesson 02's checkpoints
EMA_WARMUP = 10
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace", "quadratic", "logsnr", "flow_time")  # diffusers' names,
# DDIM's, DPM-Solver's, and SD3's equal steps in flow time
SAMPLER_NAMES = {"ddim": "DDIM", "dpm-solver++": "DPM-Solver++(2M)", "euler": "Euler", "heun": "Heun"}  # --sampler -> name
# Each sampler's timestep spacing: DDIM's and DPM-Solver++'s best, measured (docs/lesson04.md "Lessons learned");
# Euler is DDIM's eta = 0 step and takes its spacing. Heun's last step is uncorrected Euler, so its grid must end at
# t = 0, where almost no noise is left (as Karras et al.'s ends at sigma_min): linspace. On the exact Gaussian
# denoiser of tests/test_flow_matching.py, Heun in 19 calls ends 0.0020 from the exact ODE solution on linspace
# and 0.063 on trailing, whose last, uncorrected step starts at t = T/steps - 1.
DEFAULT_SPACING = {"ddim": "trailing", "dpm-solver++": "logsnr", "euler": "trailing", "heun": "linspace"}
# A flow model is sampled as SD3 samples it, in equal steps of its own time s, by every sampler (docs/lesson02.md
# "eps, v or flow?": at 10 calls on lesson 02's flow checkpoint, FD - floor 23.74 for DPM-Solver++, 24.85 for Heun and
# 39.06 for DDIM = Euler, against 33.05, 142.54 and 40.54 on the spacings above).
FLOW_SPACING = "flow_time"
FLOW_TIME_SCALE = 1000  # as lesson 02: a flow model is told its time s in [0, 1] as s x 1000
PREDICTIONS = ("eps", "v", "flow")  # lesson 02's training targets
DEFAULT_STEPS = 50  # network calls of the sampler
STEP_COUNTS = (10, 20, 50, 100, 1000)  # columns of steps.png (those up to the checkpoint's T, and T itself)
INVERSION_IMAGES = 8  # training images inverted for inversion.png
INVERSION_STEPS = (10, 20, 50, 100, 200)  # step counts of inversion_error.png
STEPS_FIGURE_ROWS = 8  # starting noises in steps.png
LOG_EVERY = 50
GIF_FRAMES = 25  # snapshots along the DDIM chain for denoising.gif
INTERPOLATION_POINTS = 9  # images along each walk of interpolation.png (--interpolate)
INTERPOLATION_GRID = 5  # interpolation_grid.png is 5 x 5
WARMUP_STEPS = 200  # lesson 02's warm-up
EMA_DECAY = 0.999  # lesson 02's EMA decay: its warm-up (EMA.decay_at) reaches 0.999 only from step 8990
CHECKPOINT_EVERY = 500
GRAD_CLIP = 1.0  # largest gradient norm, as in lesson 02 (DDPM's released code)


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
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"network calls of the sampler (default {DEFAULT_STEPS}, or the model's T if smaller), "
                             f"at most T")
    parser.add_argument("--eta", type=non_negative_float, default=0.0,
                        help="noise of each DDIM step (Eq. 16), in [0, 1]: 0 deterministic, 1 DDPM-like; why 0 "
                             "suits v models and not eps ones: docs/lesson04.md "
                             "\"Where deterministic DDIM's speckle came from, and why v-prediction removes it\"")
    parser.add_argument("--sampler", choices=list(SAMPLER_NAMES), default="ddim",
                        help="ddim: Eq. 12 with --eta; dpm-solver++: DPM-Solver++(2M), deterministic and second "
                             "order, good in 10-20 steps (Lu et al. 2022); euler: Euler on the flow ODE (the same as "
                             "ddim with eta 0); heun: Heun on it (Karras et al. 2022), --steps network calls in "
                             "(steps + 1) // 2 steps")
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
                        help="which timesteps the steps visit, named as in diffusers: trailing starts at T - 1 "
                             "(Lin et al. 2024); leading is the DDIM paper's floor(c i); quadratic its Appendix D.2; "
                             "logsnr equal steps in log-SNR (DPM-Solver); flow_time equal steps in a flow model's "
                             "time s (SD3). Default: trailing for ddim and euler, logsnr for dpm-solver++, linspace "
                             "for heun; flow_time for every sampler on a flow checkpoint (measured: "
                             "docs/lesson04.md 'Lessons learned', docs/lesson02.md 'eps, v or flow?')")
    parser.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                        help="clip the predicted x0 to [-1, 1] in each step. Default: on for eps-prediction "
                             "checkpoints (x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) blows up near "
                             "t = T), off for v-prediction (nothing to blow up; clipping only bends the path)")
    parser.add_argument("--dataset", type=data.dataset_or_folder, default=None,
                        help=data.DATASET_HELP + "; default: the checkpoint's, else mnist or another one found here")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    data.add_folder_arguments(parser)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=5, help="training passes, without --checkpoint")
    length.add_argument("--max-steps", type=positive_int, default=None, help="stop training after this many steps")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per training step")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (lesson 02's default)")
    parser.add_argument("--width", type=positive_int, default=16, help="channels at full resolution (lesson 02)")
    parser.add_argument("--channel-mults", type=channel_mults, default=(1, 2, 4), help="as in lesson 02")
    parser.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="as in lesson 02")
    parser.add_argument("--timesteps", type=positive_int, default=None,
                        help=f"diffusion steps T when training (default {T}, as lesson 02); a checkpoint keeps its own")
    parser.add_argument("--prediction", choices=list(PREDICTIONS), default="v",
                        help="training target, as in lesson 02 (checkpoints say which they were trained with); flow "
                             "draws its times as lesson 02's default, logit-normal")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--out", type=writable_dir, default=f"outputs/{LESSON}", help="output folder")
    parser.add_argument("--num-samples", type=positive_int, default=64,
                        help="images to generate (all in samples.npz; samples.png shows 64)")
    parser.add_argument("--sample-batch-size", type=positive_int, default=SAMPLE_BATCH_SIZE,
                        help="images per sampling batch, whatever --num-samples is "
                             "(docs/lesson04.md \"Sampling many images\")")
    parser.add_argument("--resume", action="store_true", help="continue training from OUT/checkpoint.pt")
    parser.add_argument("--sample-only", action="store_true",
                        help="no training: sample from --checkpoint (default OUT/checkpoint.pt)")
    parser.add_argument("--interpolate", action="store_true",
                        help="also walk between starting noises (slerp and lerp), decoded by DDIM at --steps with "
                             "eta = 0, the deterministic map from noise to image: interpolation.png/.gif and "
                             "interpolation_grid.png")
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)  # the flags the user wrote: those a run would ignore are refused
    data.check_folder_arguments(parser, args)
    data.check_unet_arguments(parser, args)  # the same refusals in every copy of lesson 02's U-Net
    if args.eta > 0 and args.sampler != "ddim":
        parser.error(f"--eta is DDIM's noise; {SAMPLER_NAMES[args.sampler]} is deterministic and has none: drop --eta "
                     f"or use --sampler ddim")
    if args.eta > 1:
        parser.error(f"--eta must be at most 1, got {args.eta:g}: above 1 DDIM's sigma (Eq. 16) exceeds "
                     f"sqrt(1 - alpha_bar_prev), and Eq. 12's direction term would need the root of a negative number")
    check_timesteps(parser, args.timesteps, linear=args.schedule == "linear", beta_end=BETA_END)
    if args.steps is not None and args.steps > (args.timesteps or T) and not (
            args.sample_only or args.resume or args.checkpoint):  # a checkpoint's own T is checked once it is read
        parser.error(f"--steps must be at most T = {args.timesteps or T}, the number of training timesteps, "
                     f"got {args.steps}")
    if args.resume and (args.sample_only or args.checkpoint):
        parser.error("--resume continues training in --out; it cannot be used with --sample-only or --checkpoint")
    return args


# --- noise schedule: only alpha_bar is needed by DDIM ---
# Timesteps are 0-based in code: t = 0 .. T-1 here is t = 1 .. T in the papers. DDIM's paper writes
# alpha_t for what DDPM (and this course) calls alpha_bar_t.

def make_schedule(name, device, timesteps=T):
    """Lesson 02's linear or cosine schedule: {"betas", "alphas", "alpha_bars"}, each [timesteps] float32 on
    `device` for t = 0 .. T-1. DDIM needs only alpha_bars (diffusers: alphas_cumprod)."""
    if name == "linear":
        scale = 1000 / timesteps  # as lesson 02: DDPM's betas are for T = 1000
        betas = torch.linspace(BETA_START * scale, BETA_END * scale, timesteps, dtype=torch.float64)
    else:
        steps = torch.arange(timesteps + 1, dtype=torch.float64)
        f = torch.cos((steps / timesteps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2  # Improved DDPM Eq. 17
        betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    alphas = 1 - betas
    schedule = {"betas": betas, "alphas": alphas, "alpha_bars": torch.cumprod(alphas, dim=0)}
    return {name: values.float().to(device) for name, values in schedule.items()}  # MPS has no float64


def add_noise(x0, t, eps, alpha_bars):
    """x_t ~ q(x_t | x_0) (DDPM Eq. 4): x0, eps [B, C, H, W], t [B] -> x_t."""
    alpha_bar_t = alpha_bars[t].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


# --- samplers: DDIM and DPM-Solver++(2M) ---

def log_snr(alpha_bar):
    """lambda = log(alpha / sigma) = 0.5 log(alpha_bar / (1 - alpha_bar)), DPM-Solver's time variable."""
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def timestep_sequence(steps, spacing="trailing", alpha_bars=None):
    """The timesteps tau_1 < ... < tau_S the sampler visits, an increasing list of `steps` distinct 0-based t;
    sampling walks it from the end and its last step lands on the clean image. Names as diffusers' timestep_spacing:
      trailing  T-1, T-1-T/S, ...: the first step starts from the last training timestep, where x_T is noise
                (Lin et al. 2024, arXiv:2305.08891, Table 2);
      leading   0, T//S, 2T//S, ... (DDIM Section 4.2, floor(c i)): starts at T - T/S, where on the cosine
                schedule x_t still holds signal (alpha_bar = 0.00088 at t = 980), yet x_T is drawn as pure noise;
      linspace  round(i (T-1) / (S-1)), from 0 to T-1;
    and two more:
      quadratic floor(c i^2) (DDIM Appendix D.2), dense at small t; here c makes the last step T-1;
      logsnr    equal steps in lambda = log_snr(alpha_bar) from t = T-1 towards t = 0 (DPM-Solver's "logSNR"
                time steps, Lu et al. 2022, arXiv:2206.00927; diffusers' use_lu_lambdas); needs `alpha_bars` [T];
      flow_time equal steps in the flow time s = flow_time(alpha_bar) of the straight path, s = 1, 1 - 1/S, ...,
                1/S, each at the nearest t (SD3's sigmas, Esser et al. 2024, arXiv:2403.03206, with shift 1);
                needs `alpha_bars` [T].
    T is the schedule's length, len(alpha_bars), or the module's T without one.
    Raises ValueError for an unknown spacing, or logsnr or flow_time without alpha_bars."""
    timesteps = T if alpha_bars is None else len(alpha_bars)
    if spacing == "trailing":
        return [round(timesteps - k * timesteps / steps) - 1 for k in range(steps)][::-1]
    if spacing == "leading":
        return [i * (timesteps // steps) for i in range(steps)]
    if spacing == "linspace":
        return [round(i * (timesteps - 1) / max(1, steps - 1)) for i in range(steps)]
    if spacing == "quadratic":
        last = timesteps - 1
        taus = [int(last * i * i / (steps - 1) ** 2) for i in range(steps)] if steps > 1 else [last]
    elif spacing == "logsnr":
        if alpha_bars is None:
            raise ValueError("the logsnr timestep spacing needs the schedule's alpha_bars")
        lambdas = torch.tensor([log_snr(a) for a in alpha_bars.tolist()], dtype=torch.float64)  # falls as t grows
        lowest, highest = lambdas[-1].item(), lambdas[0].item()
        # k = 0 is t = T-1; the clean image (beyond t = 0) is where the last step lands.
        targets = torch.tensor([lowest + (highest - lowest) * k / steps for k in range(steps)], dtype=torch.float64)
        taus = (lambdas[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()[::-1]  # nearest t to each
    elif spacing == "flow_time":
        if alpha_bars is None:
            raise ValueError("the flow_time timestep spacing needs the schedule's alpha_bars")
        times = torch.tensor([flow_time(a) for a in alpha_bars.tolist()], dtype=torch.float64)  # rises with t
        targets = torch.tensor([1 - k / steps for k in range(steps)], dtype=torch.float64)  # 1 is t = T-1
        taus = (times[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose from {', '.join(TIMESTEP_SPACINGS)}")
    for i in range(1, steps):  # where neighbours round to the same t, keep the steps distinct ...
        taus[i] = max(taus[i], taus[i - 1] + 1)
    taus[-1] = min(taus[-1], timesteps - 1)
    for i in range(steps - 2, -1, -1):  # ... and below T
        taus[i] = min(taus[i], taus[i + 1] - 1)
    return taus


def timestep_pairs(steps, spacing="trailing", alpha_bars=None):
    """The steps of a sampler as (t, t_prev) pairs from T-1 down; t_prev = -1 means the clean image."""
    taus = timestep_sequence(steps, spacing, alpha_bars)
    return list(zip(taus[::-1], [*taus[-2::-1], -1]))


def flow_time(alpha_bar):
    """The time s in [0, 1] of the straight path x = (1 - s) x0 + s eps that has the signal-to-noise ratio of
    alpha_bar: s = sqrt(1 - alpha_bar) / (sqrt(alpha_bar) + sqrt(1 - alpha_bar)). 0 for the clean image (alpha_bar
    = 1), 1 for pure noise (alpha_bar = 0)."""
    signal, noise = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    return noise / (signal + noise)


def flow_scale(alpha_bar):
    """x_t of the schedule divided by this, sqrt(alpha_bar) + sqrt(1 - alpha_bar), is its twin on the straight
    path at s = flow_time(alpha_bar): the same x0 and eps in the same proportion."""
    return math.sqrt(alpha_bar) + math.sqrt(1 - alpha_bar)


def to_eps_and_x0(output, x_t, alpha_bar_t, prediction):
    """The conversion: a network's output [N, C, H, W] for x_t at alpha_bar_t -> (eps_pred, x0_pred), for each
    target (ValueError for another). It is linear in the output with weights set by x_t and alpha_bar_t alone, so
    a guided mix of outputs, (1 - g) a + g b, converts to the same mix of conversions: guidance commutes with it.
      eps   DDPM: eps_pred = output; x0_pred = (x_t - sqrt(1 - alpha_bar) eps_pred) / sqrt(alpha_bar);
      v     Salimans & Ho 2022, Section 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0;
      flow  the velocity eps - x0 of the twin x_s = x_t / flow_scale = (1 - s) x0 + s eps: x0 = x_s - s v and
            eps = x_s + (1 - s) v."""
    signal_rate, noise_rate = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    if prediction == "v":
        # With x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps both are read off without dividing by a small rate.
        return noise_rate * x_t + signal_rate * output, signal_rate * x_t - noise_rate * output
    if prediction == "flow":
        x_flow, s = x_t / flow_scale(alpha_bar_t), flow_time(alpha_bar_t)
        return x_flow + (1 - s) * output, x_flow - s * output
    if prediction == "eps":
        # DDIM Eq. 12's "predicted x0": DDPM Eq. 4 solved for x_0. At t = 999 this divides eps's error by
        # sqrt(alpha_bar) = 5e-5; predict_eps_and_x0's clipping keeps that from reaching the image.
        return output, (x_t - noise_rate * output) / signal_rate
    raise ValueError(f"unknown prediction target {prediction!r}; choose from {', '.join(PREDICTIONS)}")


def network_input(x_t, t, alpha_bar_t, prediction):
    """What the network is shown for x_t [N, C, H, W] at timestep t: x_t and t itself for eps and v, and for a flow
    model, which knows only the straight path, x_t's twin there and its time s x FLOW_TIME_SCALE."""
    if prediction == "flow":
        return x_t / flow_scale(alpha_bar_t), torch.full((x_t.shape[0],), flow_time(alpha_bar_t) * FLOW_TIME_SCALE,
                                                         device=x_t.device)
    return x_t, torch.full((x_t.shape[0],), t, device=x_t.device)


def predict_eps_and_x0(model, x_t, t, alpha_bar_t, prediction="eps", clip_x0=True):
    """The network's answer at timestep t as both eps_pred and x0_pred ([N, C, H, W] each), whatever it was
    trained to predict (eps, v or flow: to_eps_and_x0); every sampler below calls this once per network call."""
    signal_rate, noise_rate = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    eps_pred, x0_pred = to_eps_and_x0(model(*network_input(x_t, t, alpha_bar_t, prediction)).float(), x_t,
                                      alpha_bar_t, prediction)
    if clip_x0:
        x0_pred = x0_pred.clamp(-1, 1)
        eps_pred = (x_t - signal_rate * x0_pred) / noise_rate  # keep the pair consistent with the clipped x0
    return eps_pred, x0_pred


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta):
    """DDIM Eq. 16: sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev).

    With eta = 1 this is the DDPM posterior's standard deviation between the two steps; with eta = 0, no noise.
    """
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * math.sqrt(1 - alpha_bar_t / alpha_bar_prev)


def ddim_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev, eta, generator):
    """DDIM Eq. 12 from timestep t to t_prev < t, given the network's eps_pred and x0_pred at t:
    x_t [N, C, H, W] -> x_prev. eta must lie in [0, 1] (ValueError otherwise): above 1, sigma^2 exceeds
    1 - alpha_bar_prev and the direction term has no real square root."""
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM's eta must lie in [0, 1], got {eta}")
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    # Eq. 12: x_prev = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - sigma^2) eps_pred + sigma z:
    # the predicted image, plus the predicted noise at the level of t_prev ("direction pointing to x_t").
    # (max(0, ...) only absorbs rounding: with eta <= 1, sigma^2 <= 1 - alpha_bar_prev.)
    x_prev = math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(max(0.0, 1 - alpha_bar_prev - sigma ** 2)) * eps_pred
    if sigma > 0:
        x_prev = x_prev + sigma * torch.randn(x_t.shape, device=x_t.device, generator=generator)
    return x_prev


def dpm_solver_step(x_t, x0_pred, alpha_bar_t, alpha_bar_prev, previous):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) from t to t_prev < t: x_t [N, C, H, W]
    -> (x_prev, state for the next step). `previous` is the last step's (x0_pred, h), or None on the first step.

    It is DDIM's eta = 0 step with x0_pred replaced by a line through this and the last x0_pred, in log-SNR time.
    """
    if alpha_bar_prev == 1.0:  # the last step, to the clean image: lambda is infinite, the update is x0_pred
        return x0_pred, None
    h = log_snr(alpha_bar_prev) - log_snr(alpha_bar_t)  # the step's length in lambda
    x0_estimate = x0_pred
    if previous is not None:
        # 1. D_i = (1 + 1/(2 r)) x0_pred - 1/(2 r) x0_last, r = h_last / h: x0 extrapolated to the middle of
        # the step (second order), from the two latest predictions.
        x0_last, h_last = previous
        r = h_last / h
        x0_estimate = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * x0_last
    # 2. x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^-h - 1) D_i; with D_i = x0_pred this is DDIM's eta = 0.
    x_prev = (math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * x_t
              - math.sqrt(alpha_bar_prev) * math.expm1(-h) * x0_estimate)
    return x_prev, (x0_pred, h)


def euler_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev):
    """One Euler step of the flow ODE dx/ds = v, v = eps - x0 (the ODE of SD3's sampler), from timestep t to
    t_prev < t, in the schedule's variables: x_t [N, C, H, W] -> x_prev. Its twin x_s = x_t / flow_scale moves on
    the straight path by (s_prev - s) v_pred, then is scaled back. Written out, flow_scale(alpha_bar_prev) ((1 -
    s_prev) x0_pred + s_prev eps_pred) = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev) eps_pred: DDIM's
    eta = 0 step (Eq. 12), whatever the model predicts (the tests check it to float precision)."""
    s, s_prev = flow_time(alpha_bar_t), flow_time(alpha_bar_prev)
    x_flow = x_t / flow_scale(alpha_bar_t)
    return (x_flow + (s_prev - s) * (eps_pred - x0_pred)) * flow_scale(alpha_bar_prev)


def heun_step(predict, x_t, eps_pred, x0_pred, t_prev, alpha_bar_t, alpha_bar_prev):
    """One step of Heun's method on the flow ODE (Karras et al. 2022, Algorithm 1, in flow time): Euler to t_prev,
    ask the network there (`predict(x, t_prev, alpha_bar_prev)` -> (eps_pred, x0_pred)), and take the step again
    with the mean of the two velocities. The last step (t_prev = -1, to the clean image) stays Euler, as in
    Karras et al.: at s = 0 the network would be asked about an image with no noise left to predict."""
    x_prev = euler_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev)
    if t_prev < 0:
        return x_prev
    eps_next, x0_next = predict(x_prev, t_prev, alpha_bar_prev)
    s, s_prev = flow_time(alpha_bar_t), flow_time(alpha_bar_prev)
    velocity = 0.5 * ((eps_pred - x0_pred) + (eps_next - x0_next))
    return (x_t / flow_scale(alpha_bar_t) + (s_prev - s) * velocity) * flow_scale(alpha_bar_prev)


def solver_steps(sampler, calls):
    """How many steps a sampler takes in `calls` network calls: one call per step, Heun two per step but the
    last, so (calls + 1) // 2 steps in 2 steps - 1 calls (an even budget leaves one call unused)."""
    return (calls + 1) // 2 if sampler == "heun" else calls


def network_calls(sampler, steps):
    """The network calls of `steps` steps of a sampler (the inverse of solver_steps)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def spacing_for(sampler, chosen=None, prediction="eps"):
    """The timestep spacing a sampler uses: the one chosen, else its default for the model's prediction target
    (FLOW_SPACING for a flow model, DEFAULT_SPACING[sampler] for eps and v)."""
    return chosen or (FLOW_SPACING if prediction == "flow" else DEFAULT_SPACING[sampler])


def clip_for(prediction, chosen=None):
    """Whether to clip x0_pred: as chosen, else only for eps-prediction (see --clip-x0)."""
    return prediction == "eps" if chosen is None else chosen


@torch.inference_mode()
def sample(model, alpha_bars, x_T, steps, sampler="ddim", eta=0.0, spacing=None, prediction="eps",
           clip_x0=None, generator=None, snapshots=0):
    """Noise x_T [N, C, H, W] -> images in [-1, 1] in `steps` network calls (1..T), with DDIM (DDIM Eq. 12,
    0 <= eta <= 1), DPM-Solver++(2M), Euler or Heun (the last three deterministic: ValueError for eta > 0); also
    about `snapshots` (a count) along the way, as (timestep, x_t) pairs. alpha_bars [T] is the training schedule
    (a flow model is asked at each timestep's twin on its path, so it samples on any schedule); spacing defaults to
    the sampler's DEFAULT_SPACING, clip_x0 to clip_for(prediction). Heun takes solver_steps("heun", steps) steps.
    Raises ValueError for an unknown spacing, sampler or prediction target."""
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLER_NAMES)}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's noise; {SAMPLER_NAMES[sampler]} is deterministic, got eta = {eta}")
    spacing, clip_x0 = spacing_for(sampler, spacing, prediction), clip_for(prediction, clip_x0)
    alpha_bars_list = alpha_bars.tolist()  # Python floats: no tensor ops around the network in the loop
    steps = solver_steps(sampler, steps)
    x_t, kept, previous = x_T, [], None
    every = max(1, steps // snapshots) if snapshots else 0
    pairs = timestep_pairs(steps, spacing, alpha_bars)

    def predict(x, t, alpha_bar):
        return predict_eps_and_x0(model, x, t, alpha_bar, prediction, clip_x0)

    progress = tqdm(pairs, desc=f"{SAMPLER_NAMES[sampler]} {steps} steps", leave=False)
    for index, (t, t_prev) in enumerate(progress):
        alpha_bar_t, alpha_bar_prev = alpha_bars_list[t], alpha_bars_list[t_prev] if t_prev >= 0 else 1.0
        eps_pred, x0_pred = predict(x_t, t, alpha_bar_t)
        if sampler == "ddim":
            x_t = ddim_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev, eta, generator)
        elif sampler == "euler":
            x_t = euler_step(x_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_prev)
        elif sampler == "heun":
            x_t = heun_step(predict, x_t, eps_pred, x0_pred, t_prev, alpha_bar_t, alpha_bar_prev)
        else:
            x_t, previous = dpm_solver_step(x_t, x0_pred, alpha_bar_t, alpha_bar_prev, previous)
        remaining = steps - 1 - index
        if every and remaining % every == 0:
            kept.append((max(t_prev, 0), x_t.clamp(-1, 1).cpu()))  # (timestep reached, x at it)
    return x_t.clamp(-1, 1), kept


@torch.inference_mode()
def ddim_invert(model, alpha_bars, x0, steps, spacing="trailing", prediction="eps"):
    """DDIM inversion: the sampler's eta = 0 steps (Eq. 12) run backwards, from an image x0 [N, C, H, W] up to
    the noise x_T that deterministic sampling maps back to (nearly) x0. It relies on eps_pred barely changing
    between neighbouring steps: each step uses the prediction at its lower end, where the sampler used the upper."""
    alpha_bars_list = alpha_bars.tolist()  # Python floats: no tensor ops around the network in the loop
    x_t = x0
    for t_next, t in reversed(timestep_pairs(steps, spacing, alpha_bars)):  # (t, t_next) upwards: (-1, tau_1), (tau_1, tau_2) ...
        alpha_bar_next = alpha_bars_list[t_next]
        if t < 0:
            # From the clean image, as the sampler's last step reached it: x0 is known, and eps is asked of the
            # network at tau_1 (it cannot be asked at the clean image).
            eps_pred, _ = predict_eps_and_x0(model, x_t, t_next, alpha_bar_next, prediction, clip_x0=False)
            x0_pred = x_t
        else:
            eps_pred, x0_pred = predict_eps_and_x0(model, x_t, t, alpha_bars_list[t], prediction, clip_x0=False)
        # Eq. 12 with sigma = 0, from t up to t_next: the same deterministic map, read the other way.
        x_t = math.sqrt(alpha_bar_next) * x0_pred + math.sqrt(1 - alpha_bar_next) * eps_pred
    return x_t


# --- main ---

def sampler_for(model, alpha_bars, config, args):
    """sample() with this run's network, schedule, prediction target and clipping fixed; the timestep spacing
    is --timestep-spacing or the default of the sampler asked for (spacing_for: a flow model's own, if any)."""
    prediction = config.get("prediction", "eps")

    def draw(x_T, steps, sampler=args.sampler, **options):
        return sample(model, alpha_bars, x_T, steps, sampler, spacing=spacing_for(sampler, args.timestep_spacing,
                                                                                  prediction),
                      prediction=prediction, clip_x0=clip_for(prediction, args.clip_x0), **options)
    return draw


def write_samples(model, alpha_bars, config, args, device, images):
    """samples.png/.npz, denoising.gif/.png, steps.png, inversion.png, inversion_error.png; returns the paths."""
    shape = (config["channels"], config["image_size"], config["image_size"])
    draw = sampler_for(model, alpha_bars, config, args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x_T = torch.randn((args.num_samples, *shape), device=device, generator=generator)
    started = time.perf_counter()
    samples, kept = in_batches(args.num_samples, args.sample_batch_size, lambda start, count: draw(
        x_T[start:start + count], args.steps, eta=args.eta, generator=generator, snapshots=GIF_FRAMES))
    first_batch = min(args.num_samples, args.sample_batch_size)  # the snapshots in `kept` are of the first batch
    eta = f", eta = {args.eta:g}" if args.sampler == "ddim" else ""
    print(f"sampled {args.num_samples} images in {time.perf_counter() - started:.1f} s "
          f"({SAMPLER_NAMES[args.sampler]}, {solver_steps(args.sampler, args.steps)} steps = "
          f"{network_calls(args.sampler, solver_steps(args.sampler, args.steps))} network calls{eta}, "
          f"{config.get('prediction', 'eps')}-prediction, "
          f"{spacing_for(args.sampler, args.timestep_spacing, config.get('prediction', 'eps'))} "
          f"spacing, x0 {'' if clip_for(config.get('prediction', 'eps'), args.clip_x0) else 'not '}clipped)")
    paths = [visualize.save_samples_grid(samples, args.out / "samples.png"),
             visualize.save_samples_npz(samples, args.out / "samples.npz"),
             visualize.save_denoising_gif([x_T[:first_batch].clamp(-1, 1).cpu(), *[x for _, x in kept]],
                                          args.out / "denoising.gif")]
    strip = kept[::max(1, len(kept) // 8)]
    if strip[-1] is not kept[-1]:
        strip.append(kept[-1])  # always end at the finished sample
    paths.append(visualize.save_denoising_strip([x_T[:first_batch].clamp(-1, 1).cpu(), *[x for _, x in strip]],
                                                ["noise", *[str(t) for t, _ in strip]], args.out / "denoising.png"))
    # The same starting noises at each step count, deterministic (eta = 0): each row should agree with itself.
    count = min(STEPS_FIGURE_ROWS, args.num_samples)
    timesteps = len(alpha_bars)
    step_counts = sorted({*(steps for steps in STEP_COUNTS if steps < timesteps), timesteps})
    rows = [draw(x_T[:count], steps, eta=0.0)[0] for steps in step_counts]
    paths.append(visualize.save_labeled_grid(torch.stack(rows, dim=1).flatten(0, 1), [str(i) for i in range(count)],
                                             [f"{steps} steps" for steps in step_counts], args.out / "steps.png",
                                             row_title="starting noise",
                                             column_title=f"{SAMPLER_NAMES[args.sampler]}, deterministic"))
    # Inversion: training images -> their noise -> back again, at --steps, then at each of INVERSION_STEPS.
    originals = images[:INVERSION_IMAGES].to(device)
    errors = {}
    for steps in sorted({args.steps, *(steps for steps in INVERSION_STEPS if steps <= timesteps)}):
        noise = ddim_invert(model, alpha_bars, originals, steps, spacing_for("ddim", args.timestep_spacing),
                            config.get("prediction", "eps"))
        reconstructions, _ = draw(noise, steps, sampler="ddim", eta=0.0)
        errors[steps] = (reconstructions - originals).pow(2).mean().sqrt().item()
        print(f"inversion with {steps} steps: reconstruction RMS error {errors[steps]:.4f} (images span [-1, 1])")
        if steps == args.steps:
            figure = torch.stack([originals, noise.clamp(-3, 3) / 3, reconstructions], dim=0).flatten(0, 1)
            paths.append(visualize.save_labeled_grid(
                figure, ["original", "inverted noise", "reconstruction"], [str(i) for i in range(len(originals))],
                args.out / "inversion.png", column_title=f"DDIM inversion and sampling, {steps} steps"))
    paths.append(visualize.save_curve(list(errors), list(errors.values()), args.out / "inversion_error.png",
                                      "DDIM steps (inversion, then sampling)", "reconstruction RMS error",
                                      log_x=True, marker="o"))
    return paths


def write_interpolation(model, alpha_bars, config, args, device):
    """Walks between starting noises, decoded deterministically: interpolation.png/.gif (slerp and lerp
    between the same two noises) and interpolation_grid.png (slerp between four); returns the paths.
    DDIM Section 5.3 shows such interpolations: with eta = 0, nearby x_T give related images."""
    shape = (config["channels"], config["image_size"], config["image_size"])
    draw = sampler_for(model, alpha_bars, config, args)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    corners = torch.randn((4, *shape), device=device, generator=generator)
    walks = torch.stack([interpolation.row(corners[0], corners[1], INTERPOLATION_POINTS, method)
                         for method in ("slerp", "lerp")])  # [2, K, C, H, W]
    middle = walks[:, INTERPOLATION_POINTS // 2].flatten(1).norm(dim=1) / corners[:2].flatten(1).norm(dim=1).mean()
    print(f"interpolation: half-way, the noise has {middle[0]:.2f} (slerp) and {middle[1]:.2f} (lerp) times the norm "
          f"of its end points; real noise always has about 1.00")
    decoded, _ = draw(walks.flatten(0, 1), args.steps, eta=0.0)
    paths = interpolation.save_interpolation(decoded.view(walks.shape).cpu(), ["slerp", "lerp"],
                                             args.out / "interpolation.png", args.out / "interpolation.gif")
    points = interpolation.grid(list(corners), INTERPOLATION_GRID)
    decoded, _ = draw(points, args.steps, eta=0.0)
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
    make_out_dir(args.out)
    path = args.checkpoint or (args.out / "checkpoint.pt" if args.sample_only else None)
    if path is not None:
        model, config = load_model(path, device)
        config["timesteps"] = saved_timesteps(config, args.timesteps, path)
        check_steps(args.steps, config["timesteps"], path)
        data.check_sample_settings(config, args, path)
        refuse_unused(args, ("epochs", "max_steps", "batch_size", "lr"), "when a checkpoint is sampled: it trains "
                      "nothing")
        refuse_different(args, config, ("width", "channel_mults", "schedule", "prediction"), path)
        dataset = data.load_checkpoint_data(config, args)
    else:
        start = load_checkpoint(args.out / "checkpoint.pt", LESSON) if args.resume else None
        dataset = data.load_training_data(args, start and start["config"])
        images = dataset.images.to(device)
        data.check_unet_fits(dataset, args.channel_mults)  # the same refusal as lessons 02 and 03
        steps_per_epoch = data.batches_per_epoch(len(images), args.batch_size)  # refuses a batch too big
        config = {**data.data_config(dataset), "channels": images.shape[1], "image_size": images.shape[-1],
                  "width": args.width, "channel_mults": list(args.channel_mults), "num_res_blocks": 1,
                  "schedule": args.schedule, "prediction": args.prediction, "steps_per_epoch": steps_per_epoch,
                  **({"weighting_scheme": "logit_normal"} if args.prediction == "flow" else {}),
                  "timesteps": saved_timesteps(start["config"], args.timesteps, args.out / "checkpoint.pt") if start
                  else args.timesteps or T,
                  "total_steps": args.max_steps or args.epochs * steps_per_epoch}
        if start is not None:  # the same network, schedule, target and data, or the saved state does not fit
            require_same(start["config"], config,
                         (*data.data_keys(config), "channels", "image_size", "width", "channel_mults", "schedule",
                          "prediction"),
                         args.out / "checkpoint.pt")
            check_resume_length(start, config["total_steps"], args.out / "checkpoint.pt")
        check_steps(args.steps, config["timesteps"], args.out / "checkpoint.pt")
        model = UNet(config["channels"], args.width, args.channel_mults, 1).to(device)
        ema = EMA(model, EMA_DECAY)
        alpha_bars = make_schedule(args.schedule, device, config["timesteps"])["alpha_bars"]
        train(args, model, ema, images, alpha_bars, config, device, start)
        model = ema.model
        print(f"wrote {visualize.save_loss_curve(args.out / 'metrics.csv', args.out / 'loss.png')}")
    alpha_bars = make_schedule(config["schedule"], device, config["timesteps"])["alpha_bars"]
    args.steps = args.steps or min(DEFAULT_STEPS, config["timesteps"])
    paths = write_samples(model, alpha_bars, config, args, device, dataset.images)
    if args.interpolate:
        paths += write_interpolation(model, alpha_bars, config, args, device)
    for output in paths:
        print(f"wrote {output}")


# ====================================================================================================
# Lesson 02's network, loss and training loop, unchanged: lesson 04 samples from lesson 02's checkpoints as
# they are, and trains lesson 02's default model itself only when run without --checkpoint. What lesson 04
# teaches is above; read lesson 02 for what follows.
# ====================================================================================================

# --- model: lesson 02's U-Net ---

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


# --- loss: lesson 02's ---

def loss_fn(model, x0, alpha_bars, generator, prediction="eps"):
    """DDPM Algorithm 1 on a batch x0 [B, C, H, W], lesson 02's objective: one scalar loss; for flow, lesson 02's
    flow matching loss with its default logit-normal times."""
    if prediction == "flow":
        # As lesson 02's flow_loss: x_s = (1 - s) x0 + s eps, logit(s) ~ N(0, 1) (SD3 Section 3.1), target eps - x0.
        s = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device, generator=generator))
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        return F.mse_loss(model(x_s, s * FLOW_TIME_SCALE).float(), eps - x0)
    t = torch.randint(0, len(alpha_bars), (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = add_noise(x0, t, eps, alpha_bars)
    alpha_bar_t = alpha_bars[t].view(-1, 1, 1, 1)
    # As lesson 02: eps (DDPM Eq. 14) or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022).
    target = eps if prediction == "eps" else alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0
    return F.mse_loss(model(x_t, t).float(), target)


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
    total_steps, checkpoint_path = config["total_steps"], args.out / "checkpoint.pt"
    order = EpochOrder(len(images), args.batch_size, config["steps_per_epoch"], args.seed)
    log = TrainingLog(args.out / "metrics.csv", total_steps, step, args.batch_size, LOG_EVERY, start is not None)
    with StopRequest() as stop:
        while step < total_steps and not stop.requested:
            # a batch of clean images x0, and this step's learning rate
            x0 = images[order.batch(step).to(device)]
            lr = warmup_learning_rate(step, args.lr, WARMUP_STEPS)
            set_learning_rate(optimizer, lr)
            # lesson 02's loss, update and EMA
            loss = loss_fn(model, x0, alpha_bars, generator, config.get("prediction", "eps"))
            check_finite(loss.item(), step, checkpoint_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            ema.update(model, step)
            step += 1
            # log, and save what --resume needs
            log.add(step, loss.item(), lr)
            if checkpoint_due(step, total_steps, CHECKPOINT_EVERY, stop.requested):
                save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": LESSON, "config": config, "step": step,
                                 "epoch": step // config["steps_per_epoch"], "model": model.state_dict(),
                                 "ema": ema.model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()}},
                                checkpoint_path)
    log.close()
    if stop.requested:
        raise stopped_early(step, total_steps, checkpoint_path)


if __name__ == "__main__":
    run(main)
