"""Speed of lesson 01 on this machine: training images/s per choice, and where sampling spends its time.

    python benchmarks/lesson01_speed.py [--repeats 3] [--compile]

Compares, in one run with interleaved repeats (these machines are shared and noisy, so read the ratios):
the default against other batch sizes, a wider network, the plain loss without min-SNR weighting, the
default channels_last memory layout (on the CPU) against the plain one, the network on 2x2 patches that
benchmarks/lesson01_recipe.py tried (--arch patch2) and the two with one more module at 7x7 (attn7, block7),
and optionally torch.compile. For sampling it times
DDPM steps against bare network calls on the same batch; the difference is the time spent outside the network.
Writes benchmarks/results/lesson01_speed.csv and .md, and prints the markdown table.
"""
import argparse
import statistics
import time

import torch

from common import load_lesson, write_results
from lesson01_recipe import ARCHITECTURES, Patch2UNet
from utils.runtime import pick_device

lesson01 = load_lesson("01_ddpm_toy.py")

TRAIN_STEPS = 15
SAMPLE_STEPS = 50


def train_speed(model, batch_size, channels_last, schedule, snr_gamma):
    """Training images/s on random 28x28 data (data loading is indexing, so random data is fair)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(batch_size, 1, 28, 28)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss = lesson01.loss_fn(model, images, schedule, generator, snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        step()
    return TRAIN_STEPS * batch_size / (time.perf_counter() - started)


@torch.inference_mode()
def sampling_split(model, schedule, batch):
    """Seconds per sampling step, and per bare network call, on the same batch."""
    lists = lesson01.sampling_constants(schedule)
    x_t, generator = torch.randn(batch, 1, 28, 28), torch.Generator().manual_seed(0)
    t_batch = torch.full((batch,), 500)
    for _ in range(3):
        model(x_t, t_batch)
    started = time.perf_counter()
    for t in range(SAMPLE_STEPS, 0, -1):
        lesson01.sample_step(model, x_t, t, lists, generator)
    per_step = (time.perf_counter() - started) / SAMPLE_STEPS
    started = time.perf_counter()
    for _ in range(SAMPLE_STEPS):
        model(x_t, t_batch)
    per_call = (time.perf_counter() - started) / SAMPLE_STEPS
    return per_step, per_call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = parser.parse_args()
    pick_device("cpu")
    schedule = lesson01.make_schedule(torch.device("cpu"))
    gamma = lesson01.SNR_GAMMA
    tiny, patch2 = lesson01.TinyUNet, Patch2UNet
    # (name, network, width, batch size, channels_last, torch.compile, min-SNR gamma, label if its sampling is timed)
    variants = [
        ("width 16, batch 64, channels_last (default on the CPU)", tiny, 16, 64, True, False, gamma, "default"),
        ("width 16, batch 64, without channels_last (the layout before this change)", tiny, 16, 64, False, False, gamma,
         "without channels_last"),
        ("width 16, batch 64, plain loss (--snr-gamma 0)", tiny, 16, 64, True, False, 0.0, None),
        ("width 16, batch 128 (the batch before 2026-11-30)", tiny, 16, 128, True, False, gamma, None),
        ("width 16, batch 32", tiny, 16, 32, True, False, gamma, None),
        ("width 32, batch 64", tiny, 32, 64, True, False, gamma, None),
        ("2x2 patches (lesson01_recipe.py --arch patch2), width 32, batch 64", patch2, 32, 64, True, False, gamma,
         "2x2 patches"),
        ("2x2 patches, width 32, batch 64, without channels_last", patch2, 32, 64, False, False, gamma, None),
        ("self-attention at 7x7 (lesson01_recipe.py --arch attn7), width 16, batch 64", ARCHITECTURES["attn7"], 16, 64,
         True, False, gamma, None),
        ("a second Block at 7x7 (--arch block7), width 16, batch 64", ARCHITECTURES["block7"], 16, 64, True, False,
         gamma, None)]
    if args.compile:
        variants.append(("width 16, batch 64, channels_last, torch.compile", tiny, 16, 64, True, True, gamma, None))
    models = {}
    for name, network, width, _, channels_last, compiled, _, _ in variants:
        torch.manual_seed(0)
        model = network(1, width)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[name] = torch.compile(model) if compiled else model
    speeds = {name: [] for name, *_ in variants}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits every variant alike
        for name, _, _, batch_size, channels_last, _, snr_gamma, _ in variants:
            speeds[name].append(train_speed(models[name], batch_size, channels_last, schedule, snr_gamma))
    baseline = statistics.median(speeds[variants[0][0]])
    rows = [{"measure": f"training: {name}", "value": f"{statistics.median(values):.0f} images/s",
             "ratio": f"{statistics.median(values) / baseline:.2f}"} for name, values in speeds.items()]
    for label, name in ((variant[-1], variant[0]) for variant in variants if variant[-1]):
        per_step, per_call = sampling_split(models[name], schedule, 64)
        rows += [{"measure": f"sampling, {label}: one DDPM step, batch 64", "value": f"{per_step * 1000:.1f} ms",
                  "ratio": ""},
                 {"measure": f"sampling, {label}: 1000 steps (T) for 64 images, estimated",
                  "value": f"{per_step * 1000:.1f} s", "ratio": ""},
                 {"measure": f"sampling, {label}: share of step time outside the network", "value":
                  f"{max(0.0, 1 - per_call / per_step) * 100:.1f} %", "ratio": ""}]
    command = "python benchmarks/lesson01_speed.py" + (" --compile" if args.compile else "")
    write_results(rows, "lesson01_speed",
                  f"Measured with `{command}` ({torch.get_num_threads()} threads, torch {torch.__version__}).")

if __name__ == "__main__":
    main()
