"""Pictures: the files exist, have the right size, and show the images given."""
import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from utils import visualize


def test_to_uint8_maps_the_range_ends_and_layout():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = visualize.to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 1)
    assert out.ravel().tolist() == [0, 128, 255, 255]


def test_grid_png_holds_every_image(tmp_path):
    images = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 28, 28)
    path = visualize.save_grid(images, tmp_path / "grid.png", nrow=3)
    picture = imageio.imread(path)
    scale = visualize.DISPLAY_SCALE
    assert picture.shape == (scale * (2 * 30 + 2), scale * (3 * 30 + 2), 3)
    # the centre pixel of each cell is that image's value
    centres = [picture[scale * (2 + 30 * row + 14), scale * (2 + 30 * col + 14), 0] for row in range(2) for col in range(3)]
    assert centres == [round((v + 1) * 127.5) for v in torch.linspace(-1, 1, 6).tolist()]


def test_npz_keeps_uint8_nhwc_and_labels(tmp_path):
    path = visualize.save_samples_npz(torch.zeros(5, 3, 8, 8), tmp_path / "s.npz", labels=torch.arange(5))
    loaded = np.load(path)
    assert loaded["images"].shape == (5, 8, 8, 3) and loaded["images"].dtype == np.uint8
    assert loaded["labels"].tolist() == [0, 1, 2, 3, 4]


def test_denoising_gif_and_strip(tmp_path):
    frames = [torch.full((4, 1, 28, 28), value) for value in (-1.0, 0.0, 1.0)]
    path = visualize.save_denoising_gif(frames, tmp_path / "d.gif")
    gif = imageio.mimread(path)
    assert len(gif) == 3
    assert gif[0].mean() < gif[1].mean() < gif[-1].mean()
    from PIL import Image

    durations = []
    with Image.open(path) as animation:  # what a browser plays: 80 ms per frame, the last held 1.5 s
        for index in range(animation.n_frames):
            animation.seek(index)
            durations.append(animation.info["duration"])
        assert animation.info.get("loop") == 0
    assert durations == [80, 80, 1500]
    strip = imageio.imread(visualize.save_denoising_strip(frames, [999, 500, 0], tmp_path / "d.png", rows=2))
    assert strip.ndim == 3 and strip.shape[1] > strip.shape[0]


def test_loss_curve_from_metrics_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,loss,lr,images_per_s\n50,0.2,1e-3,600\n100,0.1,1e-3,610\n")
    picture = imageio.imread(visualize.save_loss_curve(csv_path, tmp_path / "loss.png"))
    assert picture.shape[0] > 100 and picture.shape[1] > 100


def test_labeled_grid_has_a_cell_per_image(tmp_path):
    images = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 28, 28).contiguous()
    path = visualize.save_labeled_grid(images, ["w = 0", "w = 1"], ["a", "b", "c"], tmp_path / "g.png",
                                       row_title="guidance", column_title="class")
    picture = imageio.imread(path)
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0]  # 3 columns wider than 2 rows
    # The darkest (-1) and brightest (+1) images both made it into the figure.
    assert picture[..., :3].min() < 30 and picture[..., :3].max() > 225
    with pytest.raises(ValueError):
        visualize.save_labeled_grid(images, ["one row"], ["a", "b"], tmp_path / "bad.png")
