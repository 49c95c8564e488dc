"""Speed of lesson 02's U-Net on this machine: training images/s per model size and precision.

    python benchmarks/lesson02_speed.py                       # CPU: the default model and two others
    python benchmarks/lesson02_speed.py --device cuda --paper # GPU: adds the paper's CIFAR-10 model

Each variant runs full training steps (forward, backward, clipping, AdamW, EMA) on random data of
the dataset's shape: the lessons keep data in memory and batch by indexing, so random data costs
the same. Variants are timed in interleaved repeats (shared machines are noisy: read the ratios).
Also times one sampling step against a bare network call on the same batch; the difference is the
share of sampling time spent outside the network. Writes benchmarks/results/lesson02_speed_<device>.csv
and .md, and prints the markdown table.
"""
import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from common import load_lesson, write_results
from utils.runtime import pick_device

lesson02 = load_lesson("02_ddpm.py")

WARMUP_STEPS = 3
SAMPLE_STEPS = 50


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_speed(variant, device, steps):
    """Training images/s of one variant (dict with model, optimizer, ema, shape, dtype)."""
    images = torch.randn(variant["shape"], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    schedule = variant["schedule"]
    scaler = torch.amp.GradScaler(device.type, enabled=variant["dtype"] == torch.float16)

    def step(index):
        with torch.autocast(device.type, dtype=variant["dtype"]) if variant["dtype"] else nullcontext():
            loss = lesson02.loss_fn(variant["model"], images, schedule, generator)
        lesson02.update_weights(loss, variant["model"], variant["optimizer"], scaler, 1.0)
        variant["ema"].update(variant["model"], index)

    for index in range(WARMUP_STEPS):
        step(index)
    synchronize(device)
    started = time.perf_counter()
    for index in range(steps):
        step(index)
    synchronize(device)
    return steps * variant["shape"][0] / (time.perf_counter() - started)


@torch.inference_mode()
def sampling_split(model, schedule, shape, device):
    """Seconds per posterior sampling step and per bare network call, on the same batch."""
    constants = lesson02.sampling_constants(schedule, "posterior")
    x_t, generator = torch.randn(shape, device=device), torch.Generator(device=device).manual_seed(0)
    t_batch = torch.full((shape[0],), 500, device=device)
    for _ in range(3):
        model(x_t, t_batch)
    timings = []
    for run_steps in (True, False, True, False):  # interleaved
        synchronize(device)
        started = time.perf_counter()
        for t in range(SAMPLE_STEPS, 0, -1):
            if run_steps:
                lesson02.sample_step(model, x_t, t, constants, generator)
            else:
                model(x_t, t_batch)
        synchronize(device)
        timings.append((time.perf_counter() - started) / SAMPLE_STEPS)
    per_step, per_call = min(timings[0::2]), min(timings[1::2])
    return per_step, per_call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 8 CPU, 50 GPU)")
    parser.add_argument("--paper", action="store_true", help="add the paper's 35.7M-parameter CIFAR-10 model")
    args = parser.parse_args()
    device = pick_device(args.device)
    steps = args.steps or (8 if device.type == "cpu" else 50)
    # name, channels, size, width, mults, blocks, batch, precision
    specs = [("default: width 16, mults 1,2,4, 28x28", 1, 28, 16, (1, 2, 4), 1, 128, "fp32"),
             ("default at batch 64", 1, 28, 16, (1, 2, 4), 1, 64, "fp32"),
             ("width 16, mults 1,2,2, 28x28", 1, 28, 16, (1, 2, 2), 1, 128, "fp32"),
             ("width 32, mults 1,2,2, 28x28", 1, 28, 32, (1, 2, 2), 1, 128, "fp32")]
    if device.type == "cuda":
        specs += [("default, bf16", 1, 28, 16, (1, 2, 4), 1, 128, "bf16")]
    if args.paper:
        specs += [(f"paper CIFAR-10: width 128, mults 1,2,2,2, 2 blocks, 32x32, {precision}",
                   3, 32, 128, (1, 2, 2, 2), 2, 128, precision)
                  for precision in (("fp32", "bf16") if device.type == "cuda" else ("fp32",))]
    variants = {}
    for name, channels, size, width, mults, blocks, batch, precision in specs:
        torch.manual_seed(0)
        model = lesson02.UNet(channels, width, mults, blocks, dropout=0.1 if blocks == 2 else 0.0).to(device)
        variants[name] = {"model": model, "ema": lesson02.EMA(model, 0.999),
                          "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4),
                          "shape": (batch, channels, size, size), "dtype": lesson02.PRECISIONS[precision],
                          "schedule": lesson02.make_schedule("cosine", device),
                          "parameters": sum(p.numel() for p in model.parameters())}
    speeds = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            speeds[name].append(train_speed(variant, device, steps))
    baseline = statistics.median(speeds[specs[0][0]])
    rows = [{"measure": f"training, batch {variants[name]['shape'][0]}: {name} "
                        f"({variants[name]['parameters'] / 1e6:.2f}M parameters)",
             "value": f"{statistics.median(values):.0f} images/s",
             "ratio": f"{statistics.median(values) / baseline:.2f}"} for name, values in speeds.items()]
    default = variants[specs[0][0]]
    per_step, per_call = sampling_split(default["model"].eval(), default["schedule"], (64, 1, 28, 28), device)
    rows += [{"measure": "sampling, default model, batch 64: one step", "value": f"{per_step * 1000:.2f} ms",
              "ratio": ""},
             {"measure": "sampling: 1000 steps for 64 images, estimated", "value": f"{per_step * 1000:.1f} s",
              "ratio": ""},
             {"measure": "sampling: share of step time outside the network",
              "value": f"{max(0.0, 1 - per_call / per_step) * 100:.1f} %", "ratio": ""}]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    command = " ".join(["python benchmarks/lesson02_speed.py", *sys.argv[1:]])
    write_results(rows, f"lesson02_speed_{device.type}",
                  f"Measured with `{command}` on {machine}, torch {torch.__version__}.")

if __name__ == "__main__":
    main()
