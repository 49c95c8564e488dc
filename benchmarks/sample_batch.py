"""How many images per network call sampling should use: time per image per step against batch size.

    python benchmarks/sample_batch.py                  # every lesson's default network, on the CPU
    python benchmarks/sample_batch.py --device cuda

Sampling 1000 images as one batch of 1000 is slower per image than in batches of tens on a CPU (the
activations of a big batch leave the caches), so every lesson samples in batches of --sample-batch-size.
This times the sampling network call of each lesson's default model (untrained: the weights do not change
the cost) at each batch size, in interleaved repeats, and reports milliseconds per image per call and the
ratio to the fastest batch size of that lesson. Writes benchmarks/results/sample_batch_<device>.csv and .md.
"""
import argparse
import statistics
import time

import torch

from common import load_lesson, write_results
from utils.runtime import pick_device

BATCH_SIZES = (16, 32, 64, 128, 256, 1000)


def networks(device):
    """(name, network call on a batch of n) for each lesson's default sampling network."""
    lesson01, lesson02 = load_lesson("01_ddpm_toy.py"), load_lesson("02_ddpm.py")
    lesson03, lesson05 = load_lesson("03_conditional_ddpm.py"), load_lesson("05_latent_diffusion.py")
    toy = lesson01.TinyUNet(1, 16).to(device).eval()  # lesson 01's default --width
    full = lesson02.UNet(1, 16, (1, 2, 4), 1).to(device).eval()
    conditional = lesson03.build_model({"channels": 1, "width": 16, "channel_mults": [1, 2, 4], "num_res_blocks": 1,
                                        "num_classes": 10}).to(device).eval()
    latent = lesson05.UNet(4, 32, (1, 2), 7).to(device).eval()

    def call(model, shape, labels=False):
        def run(n):
            x, t = torch.randn(n, *shape, device=device), torch.full((n,), 500, device=device)
            if labels:  # lesson 03 guides with one doubled batch: conditional and unconditional halves
                return model(torch.cat([x, x]), torch.cat([t, t]), torch.zeros(2 * n, dtype=torch.long, device=device))
            return model(x, t)
        return run
    return [("01 toy U-Net, 28x28", call(toy, (1, 28, 28))), ("02/04 U-Net, 28x28", call(full, (1, 28, 28))),
            ("03 guided (doubled batch), 28x28", call(conditional, (1, 28, 28), labels=True)),
            ("05 latent U-Net, 7x7x4", call(latent, (4, 7, 7)))]


@torch.inference_mode()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000, help="images per timing (whole batches of each size)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = []
    for name, call in networks(device):
        seconds = {size: [] for size in BATCH_SIZES}
        call(BATCH_SIZES[0])  # warm-up
        for _ in range(args.repeats):
            for size in BATCH_SIZES:
                calls = max(1, args.images // size)
                started = time.perf_counter()
                for _ in range(calls):
                    call(size)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[size].append((time.perf_counter() - started) / (calls * size))
        per_image = {size: 1000 * statistics.median(values) for size, values in seconds.items()}
        best = min(per_image.values())
        rows += [{"measure": f"{name}, batch {size}: ms per image per call", "value": f"{value:.3f}",
                  "ratio": f"{value / best:.2f}"} for size, value in per_image.items()]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    write_results(rows, f"sample_batch_{device.type}",
                  f"Median of {args.repeats} interleaved repeats, about {args.images} images per timing, on {machine}, "
                  f"torch {torch.__version__}. Command: python benchmarks/sample_batch.py --device {args.device} "
                  f"--repeats {args.repeats} --images {args.images}",
                  ratio_header="ratio to the fastest batch of that network")


if __name__ == "__main__":
    main()
