"""utils/metrics.py: the Frechet distance, the cached classifier, class accuracy and entropy, input layouts."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, class_pictures, run_in_process
from utils import metrics


@pytest.fixture
def scored(learnable_mnist_classifier):
    """A data dir with a learnable 'MNIST', and a classifier trained on it and cached (once per session)."""
    return learnable_mnist_classifier


def gaussian_features(count, dim, seed, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(99))
    return (torch.randn(count, dim, generator=generator) @ mixing + shift).double()


def test_frechet_distance_of_a_set_with_itself_is_zero():
    stats = metrics.feature_statistics(gaussian_features(500, 16, 0))
    assert metrics.frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # For diagonal covariances d^2 = |mu_a - mu_b|^2 + sum_i (sigma_a,i - sigma_b,i)^2.
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0]).double(), torch.tensor([1.0, 1.0, 0.0]).double()
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5]).double(), torch.tensor([3.0, 1.0, 0.5]).double()
    distance = metrics.frechet_distance((mu_a, torch.diag(sd_a ** 2)), (mu_b, torch.diag(sd_b ** 2)))
    assert distance == pytest.approx(((mu_a - mu_b) ** 2).sum().item() + ((sd_a - sd_b) ** 2).sum().item())


def test_frechet_distance_matches_the_closed_form_for_non_commuting_2d_covariances():
    """For 2 x 2 covariances, Tr((S_a S_b)^(1/2)) = sqrt(Tr(S_a S_b) + 2 sqrt(det S_a det S_b)): the two
    eigenvalues l1, l2 of S_a S_b are real and positive, and sqrt(l1) + sqrt(l2) = sqrt(l1 + l2 + 2 sqrt(l1 l2)).
    Rotated covariances do not commute, so a wrong matrix square root (of S_a S_b taken elementwise, or
    S_a^(1/2) S_b^(1/2)) gives another number; diagonal ones would hide it."""
    def rotated(angle, variances):
        c, s = math.cos(angle), math.sin(angle)
        rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        return rotation @ torch.diag(torch.tensor(variances, dtype=torch.float64)) @ rotation.T

    mu_a, mu_b = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    for angle_a, angle_b, variances_a, variances_b in ((0.0, 0.7, [4.0, 0.25], [1.0, 9.0]),
                                                        (0.3, 1.2, [2.0, 0.1], [0.5, 3.0])):
        cov_a, cov_b = rotated(angle_a, variances_a), rotated(angle_b, variances_b)
        assert not torch.allclose(cov_a @ cov_b, cov_b @ cov_a)
        trace_sqrt = math.sqrt(torch.trace(cov_a @ cov_b).item()
                               + 2 * math.sqrt(torch.det(cov_a).item() * torch.det(cov_b).item()))
        expected = ((mu_a - mu_b) ** 2).sum().item() + torch.trace(cov_a + cov_b).item() - 2 * trace_sqrt
        assert metrics.frechet_distance((mu_a, cov_a), (mu_b, cov_b)) == pytest.approx(expected, rel=1e-9)
        assert metrics.frechet_distance((mu_b, cov_b), (mu_a, cov_a)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_grows_with_the_shift_of_the_mean():
    reference = metrics.feature_statistics(gaussian_features(2000, 8, 0))
    distances = [metrics.frechet_distance(metrics.feature_statistics(gaussian_features(2000, 8, 1, shift)), reference)
                 for shift in (0.0, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[-1] > 10 * distances[0]


def test_the_classifier_learns_and_is_cached(scored, monkeypatch):
    assert scored["accuracy"] > 0.9
    assert (scored["cache_dir"] / "classifier-mnist.pt").is_file()
    monkeypatch.setattr(metrics, "train_classifier", lambda *args: pytest.fail("the cached classifier was retrained"))
    model, accuracy = metrics.load_classifier("mnist", scored["data_dir"], scored["cache_dir"])
    assert accuracy == scored["accuracy"]
    for key, value in scored["model"].state_dict().items():
        assert torch.equal(value, model.state_dict()[key])


def test_fd_is_small_for_real_images_and_grows_with_noise_and_blur(scored):
    images, labels = class_pictures(512, seed=2)
    as_float = torch.from_numpy(images).float()[:, None] / 127.5 - 1
    noisy = (as_float + 0.5 * torch.randn(as_float.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(as_float, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    kwargs = {"data_dir": scored["data_dir"], "cache_dir": scored["cache_dir"]}
    clean = metrics.evaluate(images, "mnist", labels, **kwargs)
    assert clean["class_accuracy"] > 0.9
    assert clean["fd"] < 3 * clean["fd_real_floor"] + 1e-3
    for damaged in (noisy, blurred):
        result = metrics.evaluate(damaged, "mnist", **kwargs)
        assert result["fd"] > 5 * max(clean["fd"], 1e-3)


def test_uint8_and_float_inputs_in_either_layout_score_the_same(scored):
    images, labels = class_pictures(64, seed=3)
    kwargs = {"data_dir": scored["data_dir"], "cache_dir": scored["cache_dir"]}
    nhwc = metrics.evaluate(images[..., None], "mnist", labels, **kwargs)
    nchw = metrics.evaluate(images[:, None], "mnist", labels, **kwargs)
    floats = metrics.evaluate(torch.from_numpy(images)[:, None].float() / 127.5 - 1, "mnist", labels, **kwargs)
    assert nhwc == nchw
    assert floats["fd"] == pytest.approx(nhwc["fd"], rel=1e-5)
    assert floats["class_accuracy"] == nhwc["class_accuracy"]


def test_bad_inputs_are_refused_with_one_line():
    with pytest.raises(metrics.LessonError, match="do not match"):
        metrics.as_images(np.zeros((4, 32, 32, 3), dtype=np.uint8), 1, 28)
    with pytest.raises(metrics.LessonError, match=r"\[-1, 1\]"):
        metrics.as_images(np.full((4, 28, 28), 200.0, dtype=np.float32), 1, 28)


def test_class_entropy():
    assert metrics.class_entropy_bits(torch.arange(10).repeat(7)) == pytest.approx(np.log2(10))
    assert metrics.class_entropy_bits(torch.zeros(50, dtype=torch.int64)) == 0.0
    assert metrics.class_entropy_bits(torch.tensor([0, 1] * 5)) == pytest.approx(1.0)


def test_command_line_prints_one_json_line(scored, tmp_path, capsys):
    images, labels = class_pictures(40, seed=4)
    np.savez(tmp_path / "samples.npz", images=images[..., None], labels=labels)
    command = [sys.executable, "-m", "utils.metrics", str(tmp_path / "samples.npz"), "--dataset", "mnist",
               "--data-dir", str(scored["data_dir"]), "--cache-dir", str(scored["cache_dir"])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["samples"] == 40 and result["class_accuracy"] > 0.9 and "fd_real_floor" in result
    missing = run_in_process(metrics.main, "metrics.py", tmp_path / "none.npz", *command[4:], capsys=capsys)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "no file" in missing.stderr
    # a --limit above the file's images is refused, not silently cut to them (issue 38)
    many = run_in_process(metrics.main, "metrics.py", *command[3:], "--limit", "41", capsys=capsys)
    assert many.returncode == 1 and many.stderr.strip().count("\n") == 0, many.stderr
    assert "--limit 41 is more than the 40 images in" in many.stderr
    fewer = run_in_process(metrics.main, "metrics.py", *command[3:], "--limit", "40", capsys=capsys)
    assert fewer.returncode == 0 and json.loads(fewer.stdout)["samples"] == 40, fewer.stderr


def test_predict_makes_float64_only_on_the_cpu(monkeypatch):
    """Features become float64 for the Frechet distance, but only after leaving the device: on Apple's MPS a
    float64 tensor cannot exist. Stand-in: the model and images on the meta device (no data), copies to the CPU
    made as zeros of the same shape, and .double() refused on any device but the CPU, as MPS refuses it."""
    real_cpu, real_double = torch.Tensor.cpu, torch.Tensor.double

    def cpu(self, *arguments, **options):
        return torch.zeros(self.shape, dtype=self.dtype) if self.device.type == "meta" else real_cpu(self)

    def double(self, *arguments, **options):
        if self.device.type != "cpu":
            raise TypeError(f"float64 on {self.device.type}: an accelerator without float64 would fail here")
        return real_double(self, *arguments, **options)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "double", double)
    model = metrics.Classifier(1, 28).to("meta").eval()
    features, classes = metrics.predict(model, torch.zeros(3, 1, 28, 28, device="meta"), "meta")
    assert features.device.type == "cpu" and features.dtype == torch.float64 and features.shape == (3, metrics.FEATURES)
    assert classes.shape == (3,)
