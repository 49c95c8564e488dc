"""Shared fixtures: the repository on sys.path, lessons loaded by file, tiny IDX datasets."""
import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_lesson(filename):
    """Import a lesson file through the project's one loader (examples/lessons.py), named lesson0N_... ."""
    from examples.lessons import load_lesson as load

    return load(filename, module_name=filename.replace(".py", "").replace("0", "lesson0", 1))


def run_lesson(filename, *args, timeout=300, env=None):
    """Run a lesson file as a learner does, in a fresh interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / filename), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def run_in_process(main, prog, *args, capsys):
    """Run a lesson's command line, main(argv) through utils.runtime.run as `python PROG ARGS` does (one-line
    errors, exit codes 1, 2 and 130), but in this interpreter: a fresh one spends about 5 s importing torch.
    -> an object with returncode, stdout and stderr. `prog` is the file name argparse shows in its errors."""
    from types import SimpleNamespace

    from utils.runtime import run

    capsys.readouterr()  # start from a clean capture
    saved_argv0, sys.argv[0] = sys.argv[0], prog
    try:
        run(lambda: main([str(arg) for arg in args]))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        sys.argv[0] = saved_argv0
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def assert_refused(parse_args, argv, expected, capsys):
    """parse_args(argv) must exit with code 2 and print exactly one line containing `expected`."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args([str(arg) for arg in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and expected in lines[0], lines


@pytest.fixture(scope="session")
def lesson01():
    return load_lesson("01_ddpm_toy.py")


def write_idx(path, array, compress=True):
    """Write an unsigned-byte IDX file, the format of MNIST's files."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as file:
            file.write(payload)
    else:
        path.write_bytes(payload)


def make_shapes(count, size=28, seed=0):
    """count images of bright squares at random places: structured enough to learn fast."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    for image in images:
        top, left = rng.integers(2, size - 12, 2)
        image[top:top + 10, left:left + 10] = 255
    return images, labels


def write_mnist_like(folder, count=256, split="train", compress=True):
    """IDX image and label files in torchvision's raw layout under `folder`."""
    images, labels = make_shapes(count)
    prefix = "train" if split == "train" else "t10k"
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return images, labels


def class_pictures(count, seed):
    """28x28 uint8 images whose class (0-9) decides where a bright square sits (a 2 x 5 grid of places,
    5 pixels apart, so the classifier's 2-pixel training shifts keep classes apart): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 30, (count, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        row, column = 3 + 11 * (label // 5), 2 + 5 * (label % 5)
        image[row:row + 4, column:column + 4] = rng.integers(180, 256)
    return images, labels


def write_learnable_mnist(data_dir):
    """An 'MNIST' of class_pictures in torchvision's layout: 2048 training and 512 test images."""
    for prefix, count, seed in (("train", 2048, 0), ("t10k", 512, 1)):
        images, labels = class_pictures(count, seed)
        write_idx(data_dir / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(data_dir / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
    return data_dir


@pytest.fixture(scope="session")
def learnable_mnist_classifier(tmp_path_factory):
    """write_learnable_mnist's data and utils.metrics' classifier trained on it once per test session:
    {"data_dir", "cache_dir", "model", "accuracy"}. Tests that score samples share it."""
    from utils import metrics

    root = tmp_path_factory.mktemp("metrics")
    write_learnable_mnist(root / "data")
    model, accuracy = metrics.load_classifier("mnist", root / "data", root / "cache")
    return {"data_dir": root / "data", "cache_dir": root / "cache", "model": model, "accuracy": accuracy}


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A --data-dir holding a 256-image 'MNIST' of squares in torchvision's layout."""
    data_dir = tmp_path / "data"
    write_mnist_like(data_dir / "MNIST" / "raw")
    return data_dir


@pytest.fixture(autouse=True)
def no_system_copies_or_downloads(monkeypatch):
    """Tests see only the data they make: no system dataset copies and no network."""
    from utils import data

    monkeypatch.setattr(data, "SYSTEM_COPIES", {})

    def offline(name, data_dir):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data, "_download", offline)


CPU_FLOAT64_BY_DESIGN = ("metrics.py:", "interpolation.py:")


@pytest.fixture
def float32_on_device(monkeypatch):
    """Apple's MPS has no float64, so a lesson must move only float32 and integer tensors to its device, and
    no helper may turn the model's tensors into float64. While the test runs this records the dtype of every
    tensor moved with .to(device, ...) (modules move theirs the same way), and every conversion to float64
    (.double(), .to(torch.float64), .type(torch.float64)) made outside the two helpers that use float64 on
    the CPU only, by design: utils/metrics.py (statistics of an explicit .cpu() copy) and utils/interpolation.py
    (float64 only for CPU inputs: its working_dtype). It fails if a float64 tensor was moved or converted. Works on
    the CPU, where the tests run; tests/test_visualize.py and test_interpolation.py run the helpers on a
    stand-in device, where a CPU tensor created inside a helper would raise."""
    import torch

    moved, converted = [], []
    original_to, original_double, original_type = torch.Tensor.to, torch.Tensor.double, torch.Tensor.type

    def record_conversion(result):
        frame = sys._getframe(2)  # the code that called .to, .double or .type
        where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        if result.dtype == torch.float64 and not where.startswith(CPU_FLOAT64_BY_DESIGN):
            converted.append(where)

    def to(self, *args, **kwargs):
        result = original_to(self, *args, **kwargs)
        if "device" in kwargs or any(isinstance(arg, (torch.device, str)) for arg in args):
            moved.append(result.dtype)
        if result.dtype == torch.float64 and self.dtype != torch.float64:
            record_conversion(result)
        return result

    def double(self, *args, **kwargs):
        result = original_double(self, *args, **kwargs)
        record_conversion(result)
        return result

    def type_(self, *args, **kwargs):
        result = original_type(self, *args, **kwargs)
        if isinstance(result, torch.Tensor) and result.dtype == torch.float64 and self.dtype != torch.float64:
            record_conversion(result)
        return result

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "double", double)
    monkeypatch.setattr(torch.Tensor, "type", type_)
    yield moved
    assert moved, "no tensor was moved to a device: the check saw nothing"
    assert torch.float64 not in moved, f"{moved.count(torch.float64)} float64 tensor(s) moved to a device"
    assert not converted, f"tensors converted to float64 at {sorted(set(converted))}"


def assert_sampling_uses_the_ema_weights(checkpoint_path, sample_only, tmp_path):
    """sample_only(checkpoint, out) samples from a checkpoint into `out` (same seed each time). With the raw
    training weights ("model") scrambled the samples must stay exactly the same, and with the EMA weights
    scrambled they must change: the samples come from the EMA weights, and only from them."""
    import torch

    state = torch.load(checkpoint_path, weights_only=True)

    def scrambled(key):
        copy = dict(state)
        copy[key] = {name: torch.randn_like(value) if value.is_floating_point() else value
                     for name, value in state[key].items()}
        path = tmp_path / f"{key}-scrambled.pt"
        torch.save(copy, path)
        return path

    def images(path, name):
        sample_only(path, tmp_path / name)
        return np.load(tmp_path / name / "samples.npz")["images"]

    original = images(checkpoint_path, "original")
    assert np.array_equal(images(scrambled("model"), "raw-scrambled"), original), "samples depend on the raw weights"
    assert not np.array_equal(images(scrambled("ema"), "ema-scrambled"), original), "samples ignore the EMA weights"


def assert_ema_update_rule(EMA, warmup=10):
    """A lesson's own EMA: update(model, step) sets average <- d average + (1 - d) weights, with lesson 02's
    warm-up d = min(decay, (1 + step) / (warmup + step)), checked at the start of training, during the warm-up
    and long after it; the average never takes gradients and the trained model is left as it was."""
    import torch

    for step in (0, 50, 10**6):
        decay = min(0.99, (1 + step) / (warmup + step))
        model = torch.nn.Linear(3, 2)
        ema = EMA(model, 0.99)
        start = {name: value.clone() for name, value in ema.model.state_dict().items()}
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        ema.update(model, step)
        for name, value in model.state_dict().items():
            assert torch.equal(value, start[name] + 1.0), name
            expected = decay * start[name] + (1 - decay) * value
            assert torch.allclose(ema.model.state_dict()[name], expected, atol=1e-6), (step, name)
        assert all(not parameter.requires_grad for parameter in ema.model.parameters())
