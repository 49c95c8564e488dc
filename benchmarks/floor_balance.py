"""The real-data floor of a small sample depends on its class mix: random real images against real images
drawn in equal numbers per class, as lesson 03's guidance sweep asks for its samples.

    python benchmarks/floor_balance.py                       # 50 images, 5 draws each (seconds, once cached)
    python benchmarks/floor_balance.py --count 60 --draws 10

utils.metrics' floor (fd_real_floor) is the Frechet distance of `count` random training images to the test
split. A random draw mixes the classes unevenly; a set with exactly count/10 per class is closer to the test
split's statistics, so class-balanced samples can score below that floor without being better than real data.
Writes benchmarks/results/floor_balance_<dataset>.csv and .md, or floor_balance_<dataset>_<count>.* for another
--count than 50, so that a run at one count keeps the others' files.
"""
import argparse
import sys

import torch

from common import write_results
from utils import data, metrics


def balanced_indices(labels, count, generator, classes=10):
    """`count` distinct indices of `labels`, exactly count // classes from each class, drawn at random."""
    return torch.cat([members[torch.randperm(len(members), generator=generator)[:count // classes]]
                      for members in (torch.nonzero(labels == c).flatten() for c in range(classes))])


def results_name(dataset, count):
    """The results files' name: floor_balance_<dataset> for the default 50 images, else with _<count> added."""
    return f"floor_balance_{dataset}" + ("" if count == 50 else f"_{count}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=list(data.DATASETS))
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--count", type=int, default=50, help="images per set (a multiple of 10)")
    parser.add_argument("--draws", type=int, default=5, help="sets of each kind, seeds 0, 1, ...")
    args = parser.parse_args()
    if args.count % 10 or args.count < 10:
        parser.error(f"--count must be a positive multiple of 10, got {args.count}")
    command = " ".join(["python benchmarks/floor_balance.py", *sys.argv[1:]])
    print(f"command: {command}", flush=True)
    train = data.load_dataset(args.dataset, args.data_dir, "train")

    def distance(indices):  # scored exactly as the lessons' samples are
        return metrics.evaluate(train.images[indices], args.dataset, data_dir=args.data_dir)["fd"]

    random, balanced = [], []
    for seed in range(args.draws):
        generator = torch.Generator().manual_seed(seed)
        random.append(distance(torch.randperm(len(train.labels), generator=generator)[:args.count]))
        balanced.append(distance(balanced_indices(train.labels, args.count, generator)))
    rows = [{"measure": f"{kind}, {args.count} images, draws with seeds 0-{args.draws - 1}",
             "value": " / ".join(f"{d:.1f}" for d in values), "ratio": f"{min(values):.1f}-{max(values):.1f}"}
            for kind, values in (("random training images", random), ("training images, equal per class", balanced))]
    write_results(rows, results_name(args.dataset, args.count),
                  f"FD to the {args.dataset} test split. Measured with `{command}`.", ratio_header="range")


if __name__ == "__main__":
    main()
