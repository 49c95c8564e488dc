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
import argparse
import contextlib
import gzip
import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.runtime import LessonError, positive_int


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
    classes: tuple = ()  # the class names, label i is classes[i]; () when unlabelled (a flat image folder)


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
    return Dataset(name, scaled, torch.from_numpy(np.array(labels, dtype=np.int64)), source, DATASETS[name].classes)


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


# --- a folder of the learner's own pictures ---

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")  # others are not images: ignored
FOLDER_DATASET = "image-folder"  # the dataset name that checkpoints record for a folder given as --dataset
FOLDER_IMAGE_SIZE = 32  # default --image-size: lesson 02's CPU minutes stay minutes (a 64-pixel side costs ~4x)
FOLDER_CACHE = "image-folder-cache"  # under --data-dir: decoded images, never written into the user's folder
SKIPPED_SHOWN = 3  # names of unreadable files printed


def folder_files(folder, say_unused=False):
    """(files, class names) of an image folder: with subfolders, each subfolder holding a picture that Pillow can
    open is a class (its images found at any depth below it; a subfolder of none, empty or like the __MACOSX folder
    archive tools leave, is no class), and images directly in `folder` are ignored (a note says how many); without,
    every image in `folder` is unlabelled (class names ()). Files: sorted (path, label) pairs. say_unused: print
    the notes (once, when the folder is read; other callers only look at the classes)."""
    folder = Path(folder).expanduser()
    top = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    classes, files = [], []
    for sub in sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")):
        inside = sorted(path for path in sub.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
        if any(_opens(path) for path in inside):
            files += [(path, len(classes)) for path in inside]
            classes.append(sub.name)
        elif inside and say_unused:
            print(f"note: {sub} holds no picture that can be read; it is not a class")
    if not classes:
        return [(path, 0) for path in top], ()
    if top and say_unused:
        print(f"note: {len(top)} image(s) directly in {folder} are in no class subfolder and are not used")
    return files, tuple(classes)


def _opens(path):
    """Whether Pillow recognises `path` as a picture (its header only: cheap)."""
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - any reason it cannot be opened means it is no picture
        return False


def _fingerprint(files, size, channels):
    """Names, byte sizes and modification times of the files, with the settings: any change gives a new value."""
    digest = hashlib.sha256(f"{size} {channels} 16-bit-scaled".encode())  # (the decoder changed: not old caches)
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode())
    return digest.hexdigest()


def _decode(path):
    """One image file -> uint8 RGB [3, H, W] as a viewer shows it (transparent pixels on white, an animated GIF's
    first frame, 16-bit grayscale scaled so that 65535 is white), or None if Pillow cannot read it. Pillow is what
    torchvision's ImageFolder reads with."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(path) as opened:
            opened.seek(0)
            if opened.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" holding 0..65535): Pillow's
                # convert() would clip it at 255 (almost all white); a viewer scales 65535 to white
                levels = np.asarray(opened, dtype=np.float64) / 257.0
                opened = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8), mode="L")
            picture = opened.convert("RGBA")  # every other mode (palette, CMYK, ...) to 8-bit RGBA
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
    picture = Image.alpha_composite(white, picture).convert("RGB")
    return pil_to_tensor(picture)


def _with_channels(images, channels):
    """uint8 RGB [N, 3, H, W] -> [N, channels, H, W]: one channel is the ITU-R 601 luma, as Pillow's "L" mode."""
    if channels == 3:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def read_image(path, size, channels):
    """One picture file read as an image folder's are (any size, resized and centre-cropped, transparency on
    white): float32 [channels, size, size] in [-1, 1]. Raises LessonError, in one line, for a missing or
    unreadable file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LessonError(f"{path} is not a file")
    image = _decode(path)
    if image is None:
        raise LessonError(f"{path} cannot be read as an image (PNG, JPEG, GIF, WebP or BMP)")
    return _with_channels(_resize(image, size)[None], channels)[0].float().div(127.5).sub(1.0)


def _resize(image, size):
    """uint8 [C, H, W] -> [C, size, size]: the shorter side scaled to `size` (antialiased), then the centre cut."""
    from torchvision.transforms.v2 import functional

    return functional.center_crop(functional.resize(image, [size], antialias=True), [size, size])


def load_image_folder(folder, size=FOLDER_IMAGE_SIZE, channels=None, cache_root="data"):
    """A folder of PNG, JPEG, GIF, WebP or BMP images (any sizes) as a Dataset: each image resized and centre-
    cropped to size x size, scaled to [-1, 1]; labels from class subfolders (folder_files). channels: 1 or 3, or
    None to take them from the images (3 if any image has colour). The decoded tensor is cached under
    cache_root/image-folder-cache, keyed by the folder, and rebuilt whenever a file or a setting changes.
    Raises LessonError for a missing folder, or one without a readable image."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise LessonError(f"{folder} is not a folder")
    files, classes = folder_files(folder, say_unused=True)
    if not files:
        raise LessonError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    cache = (Path(cache_root) / FOLDER_CACHE / f"{key}-{size}-{channels or 'auto'}.pt").resolve()
    if cache.is_relative_to(folder):
        raise LessonError(f"the cache {cache} would be written into {folder}, the image folder; pass another --data-dir")
    fingerprint = _fingerprint(files, size, channels)
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt, never trusted
            saved = None
        if saved is not None and saved.get("fingerprint") == fingerprint:
            print(f"{folder}: {len(saved['images'])} images read from the cache {cache} (the files are unchanged)")
            _say_skipped(saved["skipped"], len(files), folder)
            return _folder_dataset(folder, saved["images"], saved["labels"], tuple(saved["classes"]))
    decoded, labels, skipped, started = [], [], [], time.perf_counter()
    for path, label in tqdm(files, desc=f"reading {folder.name}", unit="image", leave=False):
        image = _decode(path)  # in colour; reduced below when no image has any, or when asked
        if image is None:
            skipped.append(path.relative_to(folder))
            continue
        decoded.append(_resize(image, size))
        labels.append(label)
    if not decoded:
        raise LessonError(f"{folder}: none of its {len(files)} image files could be read")
    skipped = [str(name) for name in skipped]
    _say_skipped(skipped, len(files), folder)
    images = torch.stack(decoded)
    colourful = bool((images.amax(1) - images.amin(1)).gt(2).any())  # any pixel whose R, G and B differ
    channels = channels or (3 if colourful else 1)
    images = _with_channels(images, channels)
    labels = torch.tensor(labels, dtype=torch.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(".tmp")
    torch.save({"fingerprint": fingerprint, "images": images, "labels": labels, "classes": list(classes),
                "skipped": skipped}, temporary)
    temporary.replace(cache)
    print(f"{folder}: decoded {len(images)} images to {channels} x {size} x {size} in {time.perf_counter() - started:.1f} s; "
          f"cached in {cache}")
    return _folder_dataset(folder, images, labels, classes)


def _say_skipped(skipped, count, folder):
    if skipped:
        print(f"note: skipped {len(skipped)} unreadable file(s) of {count} in {folder}: "
              f"{', '.join(skipped[:SKIPPED_SHOWN])}{', ...' if len(skipped) > SKIPPED_SHOWN else ''}")


def _folder_dataset(folder, images, labels, classes):
    return Dataset(FOLDER_DATASET, images.float().div_(127.5).sub_(1.0), labels, str(folder), classes)


DATASET_HELP = ("training images: mnist, fashion-mnist, cifar10, or a folder of your own pictures (PNG, JPEG, GIF, "
                "WebP or BMP, any size; one subfolder per class gives labels; docs/own_images.md 'Train on your own images')")


def dataset_or_folder(text):
    """argparse type of --dataset: a built-in dataset's name, or a folder of the learner's own pictures."""
    if text in DATASETS or Path(text).expanduser().is_dir():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a dataset ({', '.join(DATASETS)}) nor a folder")


def add_folder_arguments(parser):
    """--image-size and --channels, for a folder given as --dataset: the same flags in every lesson."""
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help=f"with a folder as --dataset: the side in pixels each picture is resized and centre-cropped "
                             f"to (default {FOLDER_IMAGE_SIZE})")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="with a folder as --dataset: 1 (grayscale) or 3 (RGB); default: RGB when any picture has "
                             "colour")


def check_folder_arguments(parser, args):
    """After parsing: a folder given as --dataset becomes args.image_folder (and args.dataset None); --image-size
    and --channels without one are refused in one line (exit code 2)."""
    args.image_folder = None
    if args.dataset is not None and args.dataset not in DATASETS:
        args.image_folder, args.dataset = args.dataset, None
    if args.image_folder is None and (args.image_size is not None or args.channels is not None):
        parser.error("--image-size and --channels apply to a folder of pictures given as --dataset")


def load_training_data(args, saved=None, candidates=("mnist", "fashion-mnist")):
    """The training set a lesson's flags ask for: a folder of pictures, else --dataset (default mnist, or another of
    `candidates` found here when mnist is not; load_with_fallback). `saved`: the config of the checkpoint that
    --resume continues; an image size or channel count other than its own is refused before any file is read."""
    if args.image_folder is not None:
        for key, value in (("image_size", args.image_size or FOLDER_IMAGE_SIZE), ("channels", args.channels)):
            if saved is not None and value is not None and saved.get(key) != value:
                raise LessonError(f"the checkpoint to resume was trained with {key}={saved.get(key)}, this run has "
                                  f"{key}={value}")
        return load_image_folder(args.image_folder, args.image_size or FOLDER_IMAGE_SIZE, args.channels, args.data_dir)
    return load_with_fallback(args.dataset or "mnist", args.data_dir, explicit=args.dataset is not None,
                              candidates=list(candidates))


def data_config(dataset):
    """What a checkpoint records of its training data (besides channels and image_size, which every lesson keeps):
    the dataset's name and class names, and for an image folder its path."""
    config = {"dataset": dataset.name, "classes": list(dataset.classes)}
    if dataset.name == FOLDER_DATASET:
        config["image_folder"] = dataset.source
    return config


def data_keys(config):
    """The config keys that --resume must find unchanged: the dataset, and for an image folder its classes."""
    return ("dataset", "classes") if config.get("dataset") == FOLDER_DATASET else ("dataset",)


def check_sample_settings(config, args, path):
    """--sample-only (or a given --checkpoint): refuse, in one line, data flags that differ from what the
    checkpoint was trained on. Flags left out are taken from the checkpoint."""
    trained_on = config.get("dataset")
    if args.dataset is not None and args.dataset != trained_on:
        raise LessonError(f"{path} was trained on {trained_on}, not {args.dataset}")
    if args.image_folder is None:
        return
    if trained_on != FOLDER_DATASET:
        raise LessonError(f"{path} was trained on {trained_on}, not on an image folder")
    for key, value in (("image_size", args.image_size), ("channels", args.channels)):
        if value is not None and value != config[key]:
            raise LessonError(f"{path} was trained with {key}={config[key]}, this run asks for {key}={value}")
    folder = Path(args.image_folder).expanduser()
    classes = list(folder_files(folder)[1]) if folder.is_dir() else None
    if classes is not None and classes != config.get("classes", []):
        raise LessonError(f"{path} was trained on the classes {config.get('classes')}, {folder} has {classes}")


def load_checkpoint_data(config, args):
    """The training data of a checkpoint (its image folder with the same settings, or its dataset, not
    downloaded), for figures that show real images next to generated ones."""
    if config.get("dataset") == FOLDER_DATASET:
        return load_image_folder(config["image_folder"], config["image_size"], config["channels"], args.data_dir)
    return load_with_fallback(config["dataset"], args.data_dir, explicit=True, download=False)


def check_unet_arguments(parser, args):
    """The parse-time half of check_unet_fits, for lessons 02-04, which build lesson 02's U-Net: --image-size must
    halve len(args.channel_mults) - 1 times, and --width must be even (the time embedding pairs a sine and a cosine
    per frequency). parser.error (exit 2, one line) otherwise; one check for every copy of the network."""
    halvings = len(args.channel_mults) - 1
    if args.image_size is not None and args.image_size % 2 ** halvings:
        parser.error(f"--image-size {args.image_size} cannot be halved {halvings} times by the U-Net "
                     f"(--channel-mults): use a multiple of {2 ** halvings}")
    if args.width % 2:
        parser.error(f"--width must be even (the time embedding pairs a sine and a cosine per frequency), "
                     f"got {args.width}")


def batches_per_epoch(count, batch_size, processes=1):
    """Full batches of `batch_size` images per process in an epoch of `count` images shared by `processes`
    processes (the last, partial batch is dropped). Raises LessonError (one line) when not even one batch fills:
    training smaller batches than --batch-size asks for would silently change it."""
    steps = count // (batch_size * processes)
    if steps == 0:
        across = f" x {processes} processes" if processes > 1 else ""
        raise LessonError(f"{count} images cannot fill one batch of {batch_size}{across}: pass a --batch-size of "
                          f"at most {count // processes}")
    return steps


def check_unet_fits(dataset, channel_mults):
    """The U-Net of lessons 02-04 halves the picture once per level below the first (len(channel_mults) - 1 times)
    and adds each skip back at its own size, so the side of dataset.images [N, C, H, W] must divide by 2 that
    many times. Raises LessonError (one line) naming the fix otherwise. One check that every lesson's copy of the
    network answers, so that they refuse the same --channel-mults on the same data."""
    size, halvings = dataset.images.shape[-1], len(channel_mults) - 1
    if size % 2 ** halvings:
        raise LessonError(f"{dataset.name} images are {size}x{size}: {size} cannot be halved {halvings} times by "
                          f"--channel-mults {','.join(map(str, channel_mults))}; use fewer levels or --image-size "
                          f"a multiple of {2 ** halvings}")
