"""The data layer on small IDX files written in torchvision's layout."""
import gzip

import numpy as np
import pytest
import torch

from conftest import write_idx, write_mnist_like
from utils import data
from utils.runtime import LessonError


@pytest.mark.parametrize("compress", [True, False])
def test_local_files_load_scaled_to_minus_one_one(tmp_path, compress):
    images, labels = write_mnist_like(tmp_path / "MNIST" / "raw", count=50, compress=compress)
    dataset = data.load_dataset("mnist", tmp_path)
    assert dataset.images.shape == (50, 1, 28, 28) and dataset.images.dtype == torch.float32
    assert dataset.images.min() == -1 and dataset.images.max() == 1
    expected = torch.from_numpy(images).float()[:, None] / 127.5 - 1
    assert torch.equal(dataset.images, expected)
    assert torch.equal(dataset.labels, torch.from_numpy(labels.astype(np.int64)))
    assert dataset.source == str(tmp_path / "MNIST" / "raw")


def test_test_split_reads_the_t10k_files(tmp_path):
    write_mnist_like(tmp_path / "FashionMNIST" / "raw", count=30, split="test")
    assert len(data.load_dataset("fashion-mnist", tmp_path, split="test").images) == 30


def test_system_copy_is_used_when_data_dir_is_empty(tmp_path, monkeypatch):
    system = tmp_path / "usr-share" / "fashion-mnist"
    write_mnist_like(system, count=20)
    monkeypatch.setattr(data, "SYSTEM_COPIES", {"fashion-mnist": [system]})
    dataset = data.load_dataset("fashion-mnist", tmp_path / "empty")
    assert dataset.source == str(system) and len(dataset.images) == 20


def test_local_files_come_before_the_system_copy(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_mnist_like(system, count=20)
    write_mnist_like(tmp_path / "data" / "FashionMNIST" / "raw", count=10)
    monkeypatch.setattr(data, "SYSTEM_COPIES", {"fashion-mnist": [system]})
    assert len(data.load_dataset("fashion-mnist", tmp_path / "data").images) == 10


def test_download_is_tried_last_and_its_files_are_read(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, data_dir):
        calls.append(name)
        write_mnist_like(data_dir / "MNIST" / "raw", count=12)

    monkeypatch.setattr(data, "_download", fake_download)
    assert len(data.load_dataset("mnist", tmp_path).images) == 12
    assert calls == ["mnist"]
    data.load_dataset("mnist", tmp_path)
    assert calls == ["mnist"]  # the second time the local files are found


def test_nothing_available_says_what_was_tried_and_how_to_fix(tmp_path):
    with pytest.raises(data.DataUnavailable) as error:
        data.load_dataset("fashion-mnist", tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert f"no files in {tmp_path / 'FashionMNIST' / 'raw'}" in message
    assert "download failed (network disabled in tests)" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message


def test_download_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda *a: pytest.fail("download must not be attempted"))
    with pytest.raises(data.DataUnavailable):
        data.load_dataset("mnist", tmp_path, download=False)


def test_fallback_only_for_the_default_and_with_one_notice(tmp_path, capsys):
    write_mnist_like(tmp_path / "FashionMNIST" / "raw", count=8)
    dataset = data.load_with_fallback("mnist", tmp_path, explicit=False)
    assert dataset.name == "fashion-mnist"
    notice = capsys.readouterr().out.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith("note: mnist is not available here")
    with pytest.raises(data.DataUnavailable):
        data.load_with_fallback("mnist", tmp_path, explicit=True)


def test_truncated_file_is_reported_with_its_name(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_like(folder, count=10, compress=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LessonError, match=f"{path} is truncated or corrupt"):
        data.load_dataset("mnist", tmp_path)


def test_a_file_that_is_not_idx_is_refused(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_like(folder, count=10)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as file:
        file.write(b"<html>not found</html>")
    with pytest.raises(LessonError, match="is not an IDX file"):
        data.load_dataset("mnist", tmp_path)


def test_broken_gzip_is_reported_not_raised_as_a_traceback(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_like(folder, count=10)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(LessonError, match="cannot be read"):
        data.load_dataset("mnist", tmp_path)


def test_images_and_labels_must_match(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_like(folder, count=10)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8))
    with pytest.raises(LessonError, match="do not match"):
        data.load_dataset("mnist", tmp_path)


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(LessonError, match="unknown dataset 'svhn'"):
        data.load_dataset("svhn", tmp_path)
