"""Datasets as in-memory tensors scaled to [-1, 1], shape N x C x H x W (float32).

Sources, tried in order for each dataset:
  1. files already under --data-dir, in torchvision's layout
     (MNIST/raw/, FashionMNIST/raw/, cifar-10-batches-py/);
  2. a system copy: Debian and Ubuntu's package dataset-fashion-mnist installs
     Fashion-MNIST under /usr/share/datasets/fashion-mnist;
  3. a download through torchvision into --data-dir.
The small datasets fit in memory (MNIST: 188 MB as float32), and indexing one tensor
is faster than a DataLoader on a CPU, so the lessons batch by indexing.
"""
import contextlib
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.runtime import LessonError


@dataclass(frozen=True)
class DatasetInfo:
    folder: str  # torchvision's folder name under --data-dir
    channels: int
    size: int
    classes: tuple


DATASETS = {
    "mnist": DatasetInfo("MNIST", 1, 28, tuple(str(digit) for digit in range(10))),
    "fashion-mnist": DatasetInfo(
        "FashionMNIST", 1, 28,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": DatasetInfo(
        "cifar-10-batches-py", 3, 32,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
}

# Folders where operating-system packages install datasets (tests replace this).
SYSTEM_COPIES = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UNSIGNED_BYTE = 0x08


class DataUnavailable(LessonError):
    """No source could provide the dataset; the message says what was tried and how to fix it."""

    def __init__(self, name, tried):
        self.name, self.tried = name, tried
        hint = "put the files there, or connect to the internet so that torchvision can download them"
        if DATASETS[name].channels == 1:
            hint += "; offline, `sudo apt-get install dataset-fashion-mnist` provides Fashion-MNIST"
        super().__init__(f"{name} is not available: {'; '.join(tried)}. To fix: {hint}")


@dataclass
class Dataset:
    name: str
    images: torch.Tensor  # N x C x H x W, float32 in [-1, 1]
    labels: torch.Tensor  # N, int64
    source: str


def read_idx(path):
    """Read an IDX file of unsigned bytes (the MNIST format), gzipped or not, as a numpy array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:
        raise LessonError(f"{path} cannot be read: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UNSIGNED_BYTE:
        raise LessonError(f"{path} is not an IDX file of unsigned bytes (corrupt or wrong file?)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(size) for size in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(raw) != header + int(np.prod(shape)):
        raise LessonError(f"{path} is truncated or corrupt: header says {shape}, file has {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder, stem):
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_pair(folder, split):
    """Images (N x 1 x H x W uint8) and labels from an IDX folder, or None when files are missing."""
    image_stem, label_stem = IDX_FILES[split]
    image_path, label_path = _find_idx(folder, image_stem), _find_idx(folder, label_stem)
    if image_path is None or label_path is None:
        return None
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise LessonError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    return images[:, None], labels


def _load_cifar(data_dir, split, download):
    import torchvision

    dataset = torchvision.datasets.CIFAR10(str(data_dir), train=split == "train", download=download)
    return dataset.data.transpose(0, 3, 1, 2), np.asarray(dataset.targets)


def _download(name, data_dir):
    """Download through torchvision into data_dir (its own output is hidden; failures raise)."""
    import torchvision

    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if name == "cifar10":
            torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
            torchvision.datasets.CIFAR10(str(data_dir), train=False, download=True)
        else:
            cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
            cls(str(data_dir), train=True, download=True)


def _to_tensor(name, images, labels, source):
    scaled = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(127.5).sub_(1.0)
    return Dataset(name, scaled, torch.from_numpy(np.array(labels, dtype=np.int64)), source)


def find_local(name, data_dir="data"):
    """Where the training split of `name` already is on this machine (a folder, as text), or None; no download."""
    local = Path(data_dir) / DATASETS[name].folder
    if name == "cifar10":
        return str(local) if (local / "data_batch_1").is_file() else None
    for folder in (local / "raw", *SYSTEM_COPIES.get(name, [])):
        if all(_find_idx(folder, stem) for stem in IDX_FILES["train"]):
            return str(folder)
    return None


def load_dataset(name, data_dir="data", split="train", download=True):
    """Load one dataset from the first source that has it; raise DataUnavailable naming all tried."""
    if name not in DATASETS:
        raise LessonError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    data_dir, info = Path(data_dir), DATASETS[name]
    tried = []
    local = data_dir / info.folder
    if name == "cifar10":
        if local.is_dir():
            return _to_tensor(name, *_load_cifar(data_dir, split, False), str(local))
    else:
        for folder in (local / "raw", *SYSTEM_COPIES.get(name, [])):
            pair = _load_idx_pair(folder, split)
            if pair is not None:
                return _to_tensor(name, *pair, str(folder))
            tried.append(f"no files in {folder}")
    if name == "cifar10":
        tried.append(f"no files in {local}")
    if download:
        try:
            _download(name, data_dir)
        except Exception as error:
            # torchvision's message ends with the underlying error of its last mirror
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(error).__name__
            tried.append(f"download failed ({reason})")
        else:
            return load_dataset(name, data_dir, split, download=False)
    raise DataUnavailable(name, tried)


def load_with_fallback(name, data_dir, explicit, download=True, candidates=None):
    """The dataset asked for; when it was only the default and cannot be had, another one, said in one line.

    A dataset the user named explicitly is never swapped: its DataUnavailable is raised.
    """
    try:
        return load_dataset(name, data_dir, download=download)
    except DataUnavailable as first_error:
        if explicit:
            raise
        for other in candidates or DATASETS:
            if other == name:
                continue
            try:
                dataset = load_dataset(other, data_dir, download=download)
            except DataUnavailable:
                continue
            print(f"note: {name} is not available here ({'; '.join(first_error.tried)}); "
                  f"using {other} from {dataset.source} instead (pass --dataset to choose)")
            return dataset
        others = [other for other in candidates or DATASETS if other != name]
        raise DataUnavailable(name, first_error.tried + [f"no other dataset found either ({', '.join(others)})"])
