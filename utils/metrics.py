"""How good are generated images? Three numbers, all computed with a small classifier trained here.

  - Frechet distance (FD) between the classifier's features of generated images and of the test
    split: the Frechet Inception Distance of Heusel et al. 2017 (arXiv:1706.08500), but measured in
    the penultimate layer of a small CNN trained on the dataset itself instead of Inception-v3.
    It is NOT Inception-FID and cannot be compared with numbers in papers; compare it only with
    itself, at the same sample count, and with the real-data floor printed beside it (the FD that
    as many real training images reach against the same test split: FD is biased upwards when
    few samples are used, and the floor shows by how much).
  - class accuracy of conditional samples: how often the classifier agrees with the requested label;
  - the entropy of the predicted-class histogram, in bits (log2 10 = 3.32 when all ten classes are
    equally common): a model that draws only a few kinds of image (mode collapse) scores low.

The classifier trains once per dataset in a few CPU minutes and is cached (default outputs/metrics/).

    python -m utils.metrics outputs/02_ddpm/samples.npz --dataset fashion-mnist
prints one JSON line.
"""
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import data
from utils.runtime import (
    CHECKPOINT_FORMAT, ArgumentParser, LessonError, load_checkpoint, pick_device, positive_int, run, save_checkpoint,
)

CACHE_DIR = Path("outputs/metrics")
CLASSIFIER = "metrics-classifier"  # the `lesson` name in the cached classifier's checkpoint
FEATURES = 128  # width of the penultimate layer, the feature space of the Frechet distance
EPOCHS, BATCH_SIZE, LR = 3, 128, 2e-3  # 90.5% test accuracy on Fashion-MNIST, trained in 109 s on a 2-core CPU
SEED = 0
EVAL_BATCH = 500


class Classifier(nn.Module):
    """Two conv blocks and two linear layers: images [N, C, H, W] in [-1, 1] -> logits [N, 10]."""

    def __init__(self, channels, size, classes=10):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.convs = nn.Sequential(block(channels, 16), block(16, 32))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, FEATURES), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, classes))

    def features(self, images):
        """[N, C, H, W] -> [N, FEATURES]: the space in which FD is measured."""
        return self.embed(self.convs(images))

    def forward(self, images):
        return self.head(self.features(images))


# --- inputs ---

def as_images(images, channels, size):
    """uint8 ([0, 255]) or float ([-1, 1]) images, NHWC, NCHW or NHW -> float32 [N, C, H, W] in [-1, 1]."""
    tensor = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images.detach().cpu()
    if tensor.dim() == 3:
        tensor = tensor[:, None]
    if tensor.dim() != 4:
        raise LessonError(f"expected images as N x H x W x C or N x C x H x W, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] != channels and tensor.shape[-1] == channels:
        tensor = tensor.permute(0, 3, 1, 2)
    if tuple(tensor.shape[1:]) != (channels, size, size):
        raise LessonError(f"images of shape {tuple(tensor.shape[1:])} (C, H, W) do not match the dataset's "
                          f"{(channels, size, size)}")
    if tensor.dtype == torch.uint8:
        return tensor.float().div(127.5).sub(1.0)
    tensor = tensor.float()
    if tensor.numel() and (tensor.min() < -1.01 or tensor.max() > 1.01):
        raise LessonError(f"float images must lie in [-1, 1], these span [{tensor.min():.3g}, {tensor.max():.3g}]; "
                          f"pass uint8 for [0, 255]")
    return tensor.clamp(-1, 1)


# --- the classifier: trained once per dataset, then cached ---

def train_classifier(dataset, data_dir, device):
    """Train on the training split; returns (model in eval mode, test accuracy, seconds)."""
    train_set = data.load_dataset(dataset, data_dir, "train")
    test_set = data.load_dataset(dataset, data_dir, "test")
    torch.manual_seed(SEED)
    info = data.DATASETS[dataset]
    model = Classifier(info.channels, info.size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    steps = EPOCHS * (len(train_set.images) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()
    model.train()
    for _ in tqdm(range(EPOCHS), desc=f"training the {dataset} classifier for utils.metrics", unit="epoch"):
        order = torch.randperm(len(train_set.images), generator=generator)
        for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            images = train_set.images[batch].to(device)
            # Random shifts of up to 2 pixels: the classifier must not depend on exact placement.
            images = torch.roll(images, shifts=tuple(torch.randint(-2, 3, (2,), generator=generator).tolist()),
                                dims=(2, 3))
            loss = F.cross_entropy(model(images), train_set.labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    predictions = predict(model, test_set.images, device)[1]
    accuracy = (predictions == test_set.labels).float().mean().item()
    return model, accuracy, time.perf_counter() - started


def require_built_in(dataset):
    """Raise LessonError in one line unless `dataset` is one the metrics can score: its classifier learns the
    built-in datasets' labels and is tested on their test splits, which an image folder does not have."""
    if dataset not in data.DATASETS:
        raise LessonError(f"utils.metrics scores only {', '.join(data.DATASETS)} (its feature network is a classifier "
                          f"trained on their labels and test splits); this model was trained on {dataset}")


def load_classifier(dataset, data_dir="data", cache_dir=CACHE_DIR, device="cpu"):
    """The cached classifier of `dataset`, trained and cached first when absent: (model, test accuracy). A cache
    that cannot be read (truncated, damaged, of another kind) is trained again with a one-line note, never
    trusted. Raises LessonError (one line) for a dataset it cannot score."""
    require_built_in(dataset)
    device = torch.device(device)
    path = Path(cache_dir) / f"classifier-{dataset}.pt"
    info = data.DATASETS[dataset]
    if path.is_file():
        try:  # (only the reading: a device error below is not the cache's fault)
            state = load_checkpoint(path, CLASSIFIER)
            model = Classifier(info.channels, info.size)
            model.load_state_dict(state["model"])
            accuracy = float(state["test_accuracy"])
        except (LessonError, KeyError, RuntimeError, TypeError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"note: the cached classifier cannot be used ({reason}); training it again", file=sys.stderr)
        else:
            return model.to(device).eval(), accuracy
    model, accuracy, seconds = train_classifier(dataset, data_dir, device)
    print(f"trained the {dataset} classifier in {seconds:.0f} s: test accuracy {accuracy:.4f}; cached in {path}",
          file=sys.stderr)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": CLASSIFIER, "config": {"dataset": dataset},
                     "model": {key: value.cpu() for key, value in model.state_dict().items()},
                     "test_accuracy": accuracy, "train_seconds": seconds}, path)
    return model, accuracy


@torch.no_grad()
def predict(model, images, device):
    """[N, C, H, W] in [-1, 1] -> (features [N, FEATURES] float64 on the CPU, predicted classes [N])."""
    features, classes = [], []
    for start in range(0, len(images), EVAL_BATCH):
        batch = images[start:start + EVAL_BATCH].to(device)
        embedded = model.features(batch)
        features.append(embedded.cpu().double())  # float64 on the CPU only: Apple's MPS has none
        classes.append(model.head(embedded).argmax(dim=1).cpu())
    return torch.cat(features), torch.cat(classes)


# --- the numbers ---

def feature_statistics(features):
    """[N, D] -> (mean [D], covariance [D, D]), in float64."""
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T)


def _psd_sqrt(matrix):
    """Square root of a symmetric positive semi-definite matrix, by its eigendecomposition."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(stats_a, stats_b):
    """Frechet distance between two Gaussians (Dowson & Landau 1982; Heusel et al. 2017, Section 3):
    d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is computed as Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the same eigenvalues, but of a
    symmetric matrix, so the square roots are of real non-negative numbers.
    """
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(0.0, distance.item())


def class_entropy_bits(predictions, classes=10):
    """Entropy of the histogram of predicted classes, in bits: log2(classes) when all are equally common."""
    frequencies = torch.bincount(predictions, minlength=classes).double() / len(predictions)
    nonzero = frequencies[frequencies > 0]
    return -(nonzero * nonzero.log2()).sum().item() + 0.0  # + 0.0: one class gives 0, not -0


@functools.lru_cache(maxsize=4)
def _real_data(dataset, data_dir, cache_dir, device, count, seed):
    """What `evaluate` needs of the real data, computed once per process for repeated calls (compare_methods
    scores one set per method): (classifier, its test accuracy, test-split statistics, floor FD, test size)."""
    model, accuracy = load_classifier(dataset, data_dir, cache_dir, device)
    test_set = data.load_dataset(dataset, data_dir, "test")
    train_set = data.load_dataset(dataset, data_dir, "train")
    reference = feature_statistics(predict(model, test_set.images, device)[0])
    chosen = torch.randperm(len(train_set.images), generator=torch.Generator().manual_seed(seed))[:count]
    floor = frechet_distance(feature_statistics(predict(model, train_set.images[chosen], device)[0]), reference)
    return model, accuracy, reference, floor, len(test_set.images)


def evaluate(images, dataset, labels=None, data_dir="data", cache_dir=CACHE_DIR, device="cpu", seed=SEED):
    """All the numbers for generated `images` (any layout `as_images` reads) as a dict.

    fd: samples vs the test split; fd_real_floor: as many random training images vs the test split.
    """
    require_built_in(dataset)
    info = data.DATASETS[dataset]
    images = as_images(images, info.channels, info.size)
    if len(images) < 2:
        raise LessonError(f"need at least 2 images for a covariance, got {len(images)}")
    model, classifier_accuracy, reference, floor, test_count = _real_data(dataset, str(data_dir), str(cache_dir),
                                                                          torch.device(device), len(images), seed)
    features, predictions = predict(model, images, device)
    result = {"dataset": dataset, "samples": len(images), "fd": round(frechet_distance(
                  feature_statistics(features), reference), 4),
              "fd_real_floor": round(floor, 4), "fd_reference": f"test split, {test_count} images",
              "class_entropy_bits": round(class_entropy_bits(predictions, len(info.classes)), 4),
              "classifier_test_accuracy": round(classifier_accuracy, 4)}
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).flatten()
        if len(labels) != len(images):
            raise LessonError(f"{len(labels)} labels for {len(images)} images")
        result["class_accuracy"] = round((predictions == labels).double().mean().item(), 4)
    return result


def parse_args(argv=None):
    parser = ArgumentParser(description="Score generated images (a lesson's samples.npz) against a dataset.")
    parser.add_argument("samples", type=Path, help="an .npz file with key 'images' (and 'labels' if conditional)")
    parser.add_argument("--dataset", required=True, choices=list(data.DATASETS), help="what the model was trained on")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where the trained classifier is kept")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="cpu")
    parser.add_argument("--limit", type=positive_int, default=None, help="score only the first N images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.samples.is_file():
        raise LessonError(f"no file at {args.samples}")
    from utils.visualize import read_samples_npz  # (matplotlib only for the command line)

    images, labels = read_samples_npz(args.samples, args.limit)
    result = evaluate(images, args.dataset, labels, args.data_dir, args.cache_dir, pick_device(args.device))
    print(json.dumps({"file": str(args.samples), **result}))


if __name__ == "__main__":
    run(main)
