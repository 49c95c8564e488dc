"""Interpolation: lerp and slerp against their definitions, grids, and the files written."""
import math

import imageio.v2 as imageio
import pytest
import torch

from utils import interpolation


def test_weights_run_from_0_to_1():
    assert interpolation.weights(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        interpolation.weights(1)


def test_lerp_is_the_straight_line():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    points = interpolation.lerp(a, b, [0.0, 0.25, 1.0])
    assert points.shape == (3, 2, 3)
    assert torch.equal(points[0], a) and torch.equal(points[2], b) and torch.allclose(points[1], a + 0.25)


def test_slerp_on_the_unit_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    points = interpolation.slerp(a, b, [0.0, 1 / 3, 0.5, 1.0])
    half = math.sqrt(0.5)
    expected = torch.tensor([[1.0, 0.0], [math.cos(math.pi / 6), math.sin(math.pi / 6)], [half, half], [0.0, 1.0]])
    assert torch.allclose(points, expected, atol=1e-6)


def test_slerp_hits_its_end_points_and_turns_at_constant_speed():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn((1, 8, 8), generator=generator), torch.randn((1, 8, 8), generator=generator)
    points = interpolation.row(a, b, 9, "slerp")
    assert torch.allclose(points[0], a, atol=1e-6) and torch.allclose(points[-1], b, atol=1e-6)
    unit = points.flatten(1) / points.flatten(1).norm(dim=1, keepdim=True)
    angles = torch.arccos((unit[:-1] * unit[1:]).sum(1).clamp(-1, 1))
    assert torch.allclose(angles, angles.mean().expand(8), rtol=1e-3)


def test_slerp_keeps_the_norm_of_gaussian_noise_and_lerp_does_not():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn((1, 28, 28), generator=generator), torch.randn((1, 28, 28), generator=generator)
    ends = (a.norm() + b.norm()) / 2
    slerped = interpolation.row(a, b, 11, "slerp").flatten(1).norm(dim=1) / ends
    lerped = interpolation.row(a, b, 11, "lerp").flatten(1).norm(dim=1) / ends
    assert slerped.min() > 0.97  # every point has the norm of real noise (between the two end norms)
    assert abs(lerped[5] - math.sqrt(0.5)) < 0.05  # half-way, the straight line is inside the sphere


def test_slerp_of_nearly_parallel_vectors_is_finite_and_exact_at_the_ends():
    a = torch.randn(100, generator=torch.Generator().manual_seed(2))
    b = 2 * a + 1e-9 * torch.randn(100, generator=torch.Generator().manual_seed(3))
    points = interpolation.slerp(a, b, interpolation.weights(5))
    assert torch.isfinite(points).all()
    assert torch.allclose(points[0], a) and torch.allclose(points[-1], b)
    assert torch.allclose(points[2], 1.5 * a, atol=1e-6)  # same direction, norm half-way
    identical = interpolation.slerp(a, a.clone(), [0.5])
    assert torch.allclose(identical[0], a)


def test_slerp_refuses_what_has_no_answer():
    a = torch.ones(4)
    with pytest.raises(ValueError, match="opposite"):
        interpolation.slerp(a, -a, [0.5])
    with pytest.raises(ValueError, match="non-zero"):
        interpolation.slerp(a, torch.zeros(4), [0.5])
    with pytest.raises(ValueError, match="shapes"):
        interpolation.slerp(a, torch.ones(5), [0.5])


@pytest.mark.parametrize("method", ["slerp", "lerp"])
def test_grid_has_its_corners_in_place(method):
    corners = [torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    points = interpolation.grid(corners, 5, method)
    assert points.shape == (25, 1, 4, 4)
    for index, corner in zip((0, 4, 20, 24), corners):
        assert torch.allclose(points[index], corner, atol=1e-6)
    if method == "lerp":  # bilinear: the centre is the mean of the corners
        assert torch.allclose(points[12], torch.stack(corners).mean(0), atol=1e-6)


def test_files_have_every_image(tmp_path):
    rows = torch.linspace(-1, 1, 2 * 5).view(2, 5, 1, 1, 1).expand(2, 5, 1, 28, 28)
    png, gif = interpolation.save_interpolation(rows, ["slerp", "lerp"], tmp_path / "i.png", tmp_path / "i.gif")
    picture = imageio.imread(png)
    assert picture[..., :3].min() < 30 and picture[..., :3].max() > 225
    frames = imageio.mimread(gif)
    assert len(frames) == 8  # 5 steps there, 3 back (the ends are not repeated)
    assert frames[0].mean() < frames[4].mean()  # later steps of these walks are brighter
    grid = imageio.imread(interpolation.save_grid(rows.flatten(0, 1)[:9], 3, tmp_path / "g.png"))
    assert grid.shape[0] == grid.shape[1]
    with pytest.raises(ValueError):
        interpolation.save_grid(rows.flatten(0, 1), 3, tmp_path / "bad.png")


def test_helpers_keep_the_device_and_dtype_of_their_inputs(monkeypatch):
    """No CPU or float64 tensor may meet an accelerator's (Apple's MPS has no float64). lerp, row and grid run
    on the meta device (a stand-in for CUDA or MPS, holding no data); slerp branches on its inputs' values, so it
    runs on the CPU in an accelerator's working dtype, with every operation's result recorded."""
    from torch.overrides import TorchFunctionMode

    a, b = torch.randn(1, 4, 4, device="meta"), torch.randn(1, 4, 4, device="meta")
    for result in (interpolation.lerp(a, b, interpolation.weights(5)), interpolation.row(a, b, 5, "lerp"),
                   interpolation.grid([a, b, a, b], 3, "lerp")):
        assert result.device.type == "meta" and result.dtype == torch.float32

    class Recorder(TorchFunctionMode):
        dtypes = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor):
                self.dtypes.add(result.dtype)
            return result

    monkeypatch.setattr(interpolation, "working_dtype", lambda tensor: torch.float32)  # as on an accelerator
    corners = list(torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    with Recorder() as recorder:
        result = interpolation.grid(corners, 3, "slerp")
    assert result.dtype == torch.float32 and torch.float64 not in recorder.dtypes, recorder.dtypes
