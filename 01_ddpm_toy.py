"""Lesson 01: a toy DDPM, the smallest diffusion model that draws convincing images.

Paper: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", 2020, arXiv:2006.11239; the loss
weighting from Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023, arXiv:2303.09556.
Builds on: nothing; the course starts here.
New here:
  - the forward process q(x_t | x_0) in closed form, linear betas 1e-4..0.02, T = 1000;
  - a small U-Net that predicts the added noise, trained with the simple loss (Algorithm 1), each image's
    error weighted by min-SNR-5 so that the nearly clean steps do not crowd out the noisy ones;
  - ancestral sampling from pure noise in 1000 steps (Algorithm 2), each step's noise with the posterior's
    variance beta_tilde (Eq. 7).
Left out, added later: EMA, full ResNet blocks with dropout, attention, cosine schedule (lesson 02); class
guidance (03); fast sampling in 50 steps (04); diffusion in a latent space (05).

CPU:  python 01_ddpm_toy.py    about 10-20 min on 2 cores (python GETTING_STARTED.py predicts yours)
GPU:  python 01_ddpm_toy.py --device cuda --epochs 40 --width 32 --batch-size 128 --lr 2e-3 --snr-gamma 0
      3.7 min on one H100, in the recipe that the last three flags restore (the CPU recipe is not timed on a GPU)
Writes to outputs/01_ddpm_toy/: forward.png (the forward process), checkpoint.pt, samples.png,
samples.npz, denoising.gif, denoising.png, loss.png, metrics.csv.
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import data, visualize
from utils.runtime import (
    CHECKPOINT_FORMAT, SAMPLE_BATCH_SIZE, ArgumentParser, EpochOrder, StopRequest, TrainingLog, check_finite,
    check_resume_length, check_timesteps, checkpoint_due, given_flags, in_batches, load_checkpoint, make_out_dir,
    non_negative_float, pick_device, positive_float, positive_int, refuse_different, refuse_unused, require_same,
    run, save_checkpoint, saved_timesteps, set_learning_rate, stopped_early, writable_dir)

LESSON = "01_ddpm_toy"
T = 1000  # number of diffusion steps, as in the paper (the default of --timesteps)
BETA_START, BETA_END = 1e-4, 0.02  # DDPM Section 4: linear betas from 1e-4 to 0.02 (for T = 1000)
LOG_EVERY = 50  # steps between rows of metrics.csv
WARMUP_FRACTION = 0.05  # share of training spent ramping the learning rate up from 0
SNR_GAMMA = 5.0  # min-SNR loss weighting's gamma (Hang et al. 2023 recommend 5; the default of --snr-gamma)
GIF_FRAMES = 40  # snapshots of the reverse process kept for denoising.gif
ARCHITECTURE_KEYS = ("width", "channels", "image_size")


# --- arguments ---

def parse_args(argv=None):
    parser = ArgumentParser(description="Lesson 01: train a toy DDPM, then sample from it.")
    parser.add_argument("--dataset", type=data.dataset_or_folder, default=None,
                        help=data.DATASET_HELP + "; default: mnist, or another one found here when mnist is not")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    data.add_folder_arguments(parser)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=6, help="passes over the training set")
    length.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps instead")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per step (paper: 128; 64 gives twice the updates in the same minutes and "
                             "better samples here: docs/lesson01.md \"Lessons learned\")")
    parser.add_argument("--lr", type=positive_float, default=4e-3,
                        help="peak Adam learning rate, warm-up then cosine decay (paper: 2e-4 constant; 4e-3 "
                             "measured better than 2e-3 here)")
    parser.add_argument("--snr-gamma", type=non_negative_float, default=SNR_GAMMA,
                        help="min-SNR-gamma loss weighting (Hang et al. 2023); 0: DDPM's plain loss (measured worse "
                             "here: docs/lesson01.md \"Lessons learned\")")
    parser.add_argument("--width", type=positive_int, default=16,
                        help="U-Net channels at full resolution, doubled at each downsampling (DDPM's released code: 128)")
    parser.add_argument("--timesteps", type=positive_int, default=None,
                        help=f"diffusion steps T (default {T}, as in the paper; try 500 or 2000); the betas are "
                             f"scaled by 1000 / T. A checkpoint keeps its own T")
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
    if args.image_size is not None and args.image_size % 4:
        parser.error(f"--image-size must be a multiple of 4 (the U-Net halves it twice), got {args.image_size}")
    if args.resume and args.sample_only:
        parser.error("--resume and --sample-only cannot be used together")
    if args.width % 8:
        parser.error(f"--width must be a multiple of 8 (GroupNorm uses 8 groups), got {args.width}")
    check_timesteps(parser, args.timesteps, linear=True, beta_end=BETA_END)  # lesson 01's schedule is linear
    return args


# --- noise schedule ---
# Timesteps are 0-based in code: t = 0 .. T-1 here is t = 1 .. T in the paper.

def make_schedule(device, timesteps=T):
    """betas, alphas and alpha_bars, each of shape [timesteps], float32 on `device`."""
    # DDPM's betas are for T = 1000. For another T they are scaled by 1000 / T (as improved-diffusion's
    # code does), so that alpha_bar at the last step is again close to 0: x_T is pure noise.
    scale = 1000 / timesteps
    # Computed in float64 on the CPU for an accurate running product, stored as float32
    # (Apple's MPS has no float64).
    betas = torch.linspace(BETA_START * scale, BETA_END * scale, timesteps, dtype=torch.float64)
    alphas = 1.0 - betas
    # DDPM Section 2: alpha_bar_t = prod_{s<=t} alpha_s, the share of signal left at step t (diffusers calls it
    # alphas_cumprod).
    alpha_bars = torch.cumprod(alphas, dim=0)
    return {name: values.float().to(device) for name, values in
            (("betas", betas), ("alphas", alphas), ("alpha_bars", alpha_bars))}


def add_noise(x0, t, eps, schedule):
    """Sample x_t ~ q(x_t | x_0) for a batch: x0, eps [B, C, H, W], t [B] -> x_t [B, C, H, W]."""
    alpha_bar_t = schedule["alpha_bars"][t].view(-1, 1, 1, 1)
    # DDPM Eq. 4: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), so one
    # Gaussian draw jumps straight to step t instead of adding noise t times.
    return alpha_bar_t.sqrt() * x0 + (1.0 - alpha_bar_t).sqrt() * eps


# --- model: a small U-Net that predicts the noise ---

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps t [B] -> [B, dim] (Vaswani et al. 2017, Sec. 3.5)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Block(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, the time embedding added in between,
    and a shortcut around them: [B, in, H, W] -> [B, out, H, W]."""

    def __init__(self, in_channels, out_channels, embedding_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, out_channels)
        self.time = nn.Linear(embedding_dim, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, out_channels)
        same = in_channels == out_channels
        self.shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, embedding):
        h = F.silu(self.norm1(self.conv1(x)))
        # One bias per channel tells every block which noise level it is looking at.
        h = h + self.time(embedding)[:, :, None, None]
        h = F.silu(self.norm2(self.conv2(h)))
        # GroupNorm subtracts each image's mean, so without the shortcut the network could not see
        # the overall brightness of x_t. At large t the noise to predict is almost x_t itself,
        # brightness included; a blind network lets samples drift to all black or all white.
        return h + self.shortcut(x)


class TinyUNet(nn.Module):
    """eps_pred = model(x_t, t): [B, C, H, W] and [B] -> [B, C, H, W]; H, W divisible by 4.

    Resolutions for 28x28: 28 -> 14 -> 7 -> 14 -> 28, with skip connections across.
    """

    def __init__(self, channels=1, width=16):
        super().__init__()
        self.embedding_dim = 4 * width  # DDPM's models use 4x the base width
        self.time_mlp = nn.Sequential(
            nn.Linear(self.embedding_dim, self.embedding_dim), nn.SiLU(),
            nn.Linear(self.embedding_dim, self.embedding_dim),
        )
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down1 = Block(width, width, self.embedding_dim)
        self.down2 = Block(width, 2 * width, self.embedding_dim)
        self.middle = Block(2 * width, 4 * width, self.embedding_dim)
        self.up2 = Block(4 * width + 2 * width, 2 * width, self.embedding_dim)
        self.up1 = Block(2 * width + width, width, self.embedding_dim)
        self.head = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x_t, t):
        embedding = self.time_mlp(timestep_embedding(t, self.embedding_dim))
        skip1 = self.down1(self.stem(x_t), embedding)                  # [B, w, 28, 28]
        skip2 = self.down2(F.avg_pool2d(skip1, 2), embedding)          # [B, 2w, 14, 14]
        h = self.middle(F.avg_pool2d(skip2, 2), embedding)             # [B, 4w, 7, 7]
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up2(torch.cat([h, skip2], dim=1), embedding)          # [B, 2w, 14, 14]
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up1(torch.cat([h, skip1], dim=1), embedding)          # [B, w, 28, 28]
        return self.head(h)


# --- loss ---

def loss_fn(model, x0, schedule, generator, snr_gamma=SNR_GAMMA):
    """DDPM Algorithm 1 on a batch x0 [B, C, H, W] in [-1, 1]: one scalar loss, each image's squared error
    weighted by min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556; for noise prediction the weight is
    min(SNR_t, gamma) / SNR_t); snr_gamma = 0 gives DDPM's plain Eq. 14."""
    timesteps = len(schedule["betas"])  # T
    t = torch.randint(0, timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = add_noise(x0, t, eps, schedule)
    # DDPM Eq. 14, L_simple = E ||eps - eps_theta(x_t, t)||^2: the variational bound with its
    # per-step weights dropped, which the paper found gives better samples.
    per_image = (model(x_t, t) - eps).pow(2).mean(dim=(1, 2, 3))  # [B]
    if not snr_gamma:
        return per_image.mean()
    # Min-SNR-gamma puts back a per-step weight, not the bound's: a cap on the nearly clean steps. Where
    # SNR_t = alpha_bar_t / (1 - alpha_bar_t) is high the image is almost clean, and learning to remove its last
    # bit of noise competes with the noisy steps that draw the shapes. min(SNR_t, gamma) / SNR_t turns down
    # the steps with SNR_t > gamma and leaves the others at 1; with gamma = 5 and T = 1000 that is t < 130,
    # and t = 0 by a factor of 2000. Here it lowered the FD of the samples by 15% in the same training steps
    # (docs/lesson01.md "Lessons learned").
    alpha_bar_t = schedule["alpha_bars"][t]  # [B]
    snr_t = alpha_bar_t / (1.0 - alpha_bar_t)
    return (snr_t.clamp(max=snr_gamma) / snr_t * per_image).mean()


# --- sampler ---

def sampling_constants(schedule):
    """{"betas", "alphas", "alpha_bars"} as lists of Python floats: in the sampling loop, floats cost no tensor ops."""
    return {name: schedule[name].tolist() for name in ("betas", "alphas", "alpha_bars")}


def sample_step(model, x_t, t, constants, generator):
    """One reverse step of DDPM Algorithm 2: x_t [N, C, H, W] at timestep t -> x_{t-1}."""
    betas, alphas, alpha_bars = constants["betas"], constants["alphas"], constants["alpha_bars"]
    eps_pred = model(x_t, torch.full((x_t.shape[0],), t, device=x_t.device))
    # DDPM Eq. 11, the mean of p(x_{t-1} | x_t) written with the predicted noise:
    # mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_pred) / sqrt(alpha_t)
    mean = (x_t - betas[t] / math.sqrt(1.0 - alpha_bars[t]) * eps_pred) / math.sqrt(alphas[t])
    if t == 0:
        return mean  # Algorithm 2, line 3: no noise on the last step (the paper's t = 1)
    # Algorithm 2, line 4: x_{t-1} = mu + sigma_t z. DDPM Section 3.2 offers two variances, sigma_t^2 = beta_t or
    # the posterior's beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (Eq. 7). We use beta_tilde:
    # with a perfect eps_pred each step is then an exact draw from q(x_{t-1} | x_t, x_0), and on this lesson's
    # model it scored a little better (docs/lesson01.md "Lessons learned").
    posterior_variance = (1.0 - alpha_bars[t - 1]) / (1.0 - alpha_bars[t]) * betas[t]
    return mean + math.sqrt(posterior_variance) * torch.randn(x_t.shape, device=x_t.device, generator=generator)


@torch.inference_mode()
def sample(model, schedule, shape, generator, keep=()):
    """DDPM Algorithm 2: pure noise [N, C, H, W] -> images in [-1, 1], after T steps (T = the schedule's length).

    Returns the images and {t: x_t} for each t in `keep` (the denoising pictures).
    """
    constants = sampling_constants(schedule)  # so that the loop spends its time in the network
    x_t = torch.randn(shape, device=schedule["betas"].device, generator=generator)
    kept = {}
    for t in tqdm(range(len(constants["betas"]) - 1, -1, -1), desc="sampling", leave=False):
        x_t = sample_step(model, x_t, t, constants, generator)
        if t in keep:
            kept[t] = x_t.clamp(-1, 1).cpu()
    return x_t.clamp(-1, 1), kept


# --- training ---

def learning_rate(step, total_steps, peak):
    """Linear warm-up, then cosine decay to 0: in a short run the decay does what EMA does in lesson 02
    (an EMA of the weights on top of it did not improve this lesson's samples: docs/lesson01.md "Lessons learned")."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_state(model, optimizer, step, generator, config):
    """Everything --resume needs to continue exactly where training stopped."""
    return {"format": CHECKPOINT_FORMAT, "lesson": LESSON, "config": config, "step": step,
            "epoch": step // config["steps_per_epoch"], "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state(),
                                                          "generator": generator.get_state()}}


def train(args, model, images, schedule, config, device, start=None):
    """Train on `images` [N, C, H, W] (in memory on `device`); writes checkpoint.pt and metrics.csv."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    step = 0
    if start is not None:  # --resume: every state that decides what comes next
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        generator.set_state(start["rng"]["generator"])
        torch.set_rng_state(start["rng"]["torch"])
        step = start["step"]
    total_steps, checkpoint_path = config["total_steps"], args.out / "checkpoint.pt"
    order = EpochOrder(len(images), args.batch_size, config["steps_per_epoch"], args.seed)
    log = TrainingLog(args.out / "metrics.csv", total_steps, step, args.batch_size, LOG_EVERY, start is not None)
    model.train()
    with StopRequest() as stop:
        while step < total_steps and not stop.requested:
            # a batch of clean images x0, and this step's learning rate
            x0 = images[order.batch(step).to(device)]
            lr = learning_rate(step, total_steps, args.lr)
            set_learning_rate(optimizer, lr)
            # the loss: noise x0 at random timesteps, predict the noise (DDPM Algorithm 1), min-SNR weighted;
            # this weighted loss is what metrics.csv and loss.png show
            loss = loss_fn(model, x0, schedule, generator, args.snr_gamma)
            check_finite(loss.item(), step, checkpoint_path)
            # the update
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            # log, and save what --resume needs once per epoch, at the end, and on Ctrl-C
            log.add(step, loss.item(), lr)
            if checkpoint_due(step, total_steps, config["steps_per_epoch"], stop.requested):
                save_checkpoint(make_state(model, optimizer, step, generator, config), checkpoint_path)
    log.close()
    if stop.requested:
        raise stopped_early(step, total_steps, checkpoint_path)
    return step


# --- main ---

def write_forward_process(images, schedule, seed, path, count=4):
    """forward.png: a few training images through q(x_t | x_0) at t = 0, 100, ..., 999 (one noise draw each)."""
    x0 = images[:count]
    eps = torch.randn(x0.shape, device=x0.device, generator=torch.Generator(device=x0.device).manual_seed(seed))
    steps = visualize.forward_steps(len(schedule["betas"]))
    frames = [add_noise(x0, torch.full((len(x0),), t, device=x0.device), eps, schedule).cpu() for t in steps]
    return visualize.save_forward_process(frames, steps, path)


def write_samples(model, schedule, config, args, device):
    """Sample --num-samples images and write samples.png/.npz, denoising.gif/.png; return the paths."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    shape = (config["channels"], config["image_size"], config["image_size"])
    timesteps = len(schedule["betas"])
    gif_steps, strip_steps = visualize.gif_steps(timesteps, GIF_FRAMES), visualize.strip_steps(timesteps)
    model.eval()
    started = time.perf_counter()
    images, kept = in_batches(args.num_samples, args.sample_batch_size, lambda start, count: sample(
        model, schedule, (count, *shape), generator, keep={*gif_steps, *strip_steps}))
    print(f"sampled {args.num_samples} images in {time.perf_counter() - started:.1f} s ({timesteps} steps)")
    return [
        visualize.save_samples_grid(images, args.out / "samples.png"),
        visualize.save_samples_npz(images, args.out / "samples.npz"),
        visualize.save_denoising_gif([kept[t] for t in gif_steps], args.out / "denoising.gif"),
        visualize.save_denoising_strip([kept[t] for t in strip_steps], strip_steps, args.out / "denoising.png"),
    ]


def build_model(config, device):
    """The TinyUNet that `config` describes, on `device`."""
    model = TinyUNet(config["channels"], config["width"]).to(device)
    if device.type == "cpu":
        # The same network and arithmetic, its tensors stored with each pixel's channels side by side (NHWC,
        # "channels_last"): the development VM's 2-core CPU ran its convolutions 1.1-1.2x as fast on it, which
        # pays for most of the sixth epoch (docs/lesson01.md "Lessons learned"). Not measured on GPUs: they keep the
        # default layout.
        model = model.to(memory_format=torch.channels_last)
    return model


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    make_out_dir(args.out)
    if args.sample_only:
        path = args.checkpoint or args.out / "checkpoint.pt"
        checkpoint = load_checkpoint(path, LESSON)
        config = checkpoint["config"]
        data.check_sample_settings(config, args, path)
        refuse_unused(args, ("epochs", "max_steps", "batch_size", "lr", "snr_gamma"), "with --sample-only: it trains "
                      "nothing")
        refuse_different(args, config, ("width",), path)
        schedule = make_schedule(device, saved_timesteps(config, args.timesteps, path))
        model = build_model(config, device)
        model.load_state_dict(checkpoint["model"])
        for path in write_samples(model, schedule, config, args, device):
            print(f"wrote {path}")
        return
    start = load_checkpoint(args.out / "checkpoint.pt", LESSON) if args.resume else None
    dataset = data.load_training_data(args, start and start["config"])
    images = dataset.images.to(device)
    steps_per_epoch = data.batches_per_epoch(len(images), args.batch_size)  # refuses a batch the data cannot fill
    config = {**data.data_config(dataset), "channels": images.shape[1], "image_size": images.shape[2],
              "width": args.width, "batch_size": args.batch_size, "lr": args.lr, "snr_gamma": args.snr_gamma,
              "seed": args.seed,
              "timesteps": saved_timesteps(start["config"], args.timesteps, args.out / "checkpoint.pt", T) if start
              else args.timesteps or T,
              "steps_per_epoch": steps_per_epoch,
              "total_steps": args.max_steps or args.epochs * steps_per_epoch}
    if start is not None:
        start["config"].setdefault("snr_gamma", 0.0)  # checkpoints from before min-SNR trained with the plain loss
        same = ARCHITECTURE_KEYS + data.data_keys(config) + ("batch_size", "snr_gamma")
        require_same(start["config"], config, same, args.out / "checkpoint.pt")
        check_resume_length(start, config["total_steps"], args.out / "checkpoint.pt")
    schedule = make_schedule(device, config["timesteps"])
    model = build_model(config, device)
    print(f"{dataset.name}: {len(images)} images {tuple(images.shape[1:])} from {dataset.source}; "
          f"model {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters on {device}; "
          f"{config['total_steps']} steps of {args.batch_size}")
    forward = write_forward_process(images, schedule, args.seed, args.out / "forward.png")
    print(f"wrote {forward} (what the model learns to undo)")
    train(args, model, images, schedule, config, device, start)
    paths = [args.out / "checkpoint.pt", args.out / "metrics.csv",  # forward.png was announced before training
             visualize.save_loss_curve(args.out / "metrics.csv", args.out / "loss.png")]
    paths += write_samples(model, schedule, config, args, device)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
