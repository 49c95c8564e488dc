"""Speed of lesson 04's DDIM sampler against lesson 02's 1000-step DDPM sampler on the same network.

    python benchmarks/lesson04_speed.py                 # lesson 02's default model, batch 64, on the CPU
    python benchmarks/lesson04_speed.py --device cuda

Both samplers draw the same batch with the same network (lesson 02's default U-Net; the weights do
not change the cost). Measured: the wall time of a whole DDPM-1000 run and of whole DDIM runs with
10/20/50/100 steps, in interleaved repeats (shared machines are noisy: read the ratios), and the
share of DDIM's time spent outside the network (its 50-step loop against 50 bare network calls on
the same batch). Writes benchmarks/results/lesson04_speed_<device>.csv and .md and prints the table.
"""
import argparse
import statistics
import sys
import time

import torch

from common import load_lesson, write_results
from utils.runtime import pick_device

lesson02 = load_lesson("02_ddpm.py")
lesson04 = load_lesson("04_ddim_fast_sampling.py")

DDIM_STEPS = (10, 20, 50, 100)
SPLIT_STEPS = 50  # the step count whose time outside the network is measured


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device):
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


@torch.inference_mode()
def bare_calls(model, x_T, steps):
    """The network alone, as often as a `steps`-step DDIM run calls it, at the timesteps it visits."""
    for t in lesson04.timestep_sequence(steps):
        model(x_T, torch.full((x_T.shape[0],), t, device=x_T.device))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every measurement")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = lesson02.UNet(1, 16, (1, 2, 4), 1).to(device).eval()  # lesson 02's default: width 16, mults 1,2,4
    schedule = lesson02.make_schedule("cosine", device)
    alpha_bars = lesson04.make_schedule("cosine", device)["alpha_bars"]
    shape = (args.batch, 1, 28, 28)
    x_T = torch.randn(shape, device=device)

    def ddpm():
        with torch.inference_mode():
            lesson02.sample(model, schedule, shape, torch.Generator(device=device).manual_seed(0))

    def ddim(steps):
        return lambda: lesson04.sample(model, alpha_bars, x_T, steps)

    ddim(10)()  # warm-up
    times = {"ddpm": [], **{steps: [] for steps in DDIM_STEPS}, "bare": []}
    for _ in range(args.repeats):
        times["ddpm"].append(timed(ddpm, device))
        for steps in DDIM_STEPS:
            times[steps].append(timed(ddim(steps), device))
        times["bare"].append(timed(lambda: bare_calls(model, x_T, SPLIT_STEPS), device))
        times[SPLIT_STEPS].append(timed(ddim(SPLIT_STEPS), device))  # beside the bare calls, for the split
    ddpm_time = statistics.median(times["ddpm"])
    rows = [{"measure": f"DDPM, 1000 steps, batch {args.batch}", "value": f"{ddpm_time:.2f} s", "ratio": "1.00"}]
    for steps in DDIM_STEPS:
        median = statistics.median(times[steps])
        rows.append({"measure": f"DDIM, {steps} steps, batch {args.batch}", "value": f"{median:.2f} s",
                     "ratio": f"{ddpm_time / median:.1f}"})
    ddim_split, bare = min(times[SPLIT_STEPS]), min(times["bare"])
    rows.append({"measure": f"DDIM, {SPLIT_STEPS} steps: share of time outside the network",
                 "value": f"{max(0.0, 1 - bare / ddim_split) * 100:.1f} %", "ratio": ""})
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    command = " ".join(["python benchmarks/lesson04_speed.py", *sys.argv[1:]])
    write_results(rows, f"lesson04_speed_{device.type}",
                  f"Measured with `{command}` on {machine}, torch {torch.__version__}: medians of {args.repeats} "
                  f"interleaved repeats; the share outside the network compares the fastest of each.",
                  ratio_header="speed-up over DDPM-1000")


if __name__ == "__main__":
    main()
