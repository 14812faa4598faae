"""dinowm.visualize: labelled, upsampled grids and the line plot."""
import numpy as np
import pytest
import torch
from PIL import Image

from dinowm.visualize import save_grid, save_line_plot


def test_grid_upsamples_small_frames_with_nearest_and_labels_rows(tmp_path):
    frames = torch.rand(3, 3, 8, 8) * 2 - 1  # 8 px: upsampled 16x to 128 px
    path = save_grid([frames, frames[:2]], tmp_path / "g.png", ["ground truth", "prediction"], ["t", "h=1", "h=2"])
    img = np.asarray(Image.open(path))
    expected = ((frames[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    # find the first tile: a 128 x 128 block equal to the nearest-upsampled frame somewhere in the canvas
    tile = expected.repeat(16, 0).repeat(16, 1)
    ys, xs = np.nonzero((img[:, :, :] == tile[0, 0]).all(-1))
    found = any((img[y:y + 128, x:x + 128] == tile).all() for y, x in zip(ys[:2000], xs[:2000]))
    assert found
    assert img.shape[0] > 2 * 128 and img.shape[1] > 3 * 128  # room for labels
    left_margin = img[:, :20]
    assert (left_margin < 128).any()  # the row labels are drawn (dark text on white)


def test_grid_checks_labels(tmp_path):
    with pytest.raises(ValueError, match="2 rows but 1 row labels"):
        save_grid([torch.zeros(1, 3, 4, 4)] * 2, tmp_path / "g.png", ["a"])


def test_line_plot_draws_every_series(tmp_path):
    path = save_line_plot([1, 2, 3], {"model": [0.1, 0.2, 0.3], "copy_last": [0.2, 0.25, 0.4]}, tmp_path / "p.png",
                          xlabel="horizon", ylabel="MSE", log_y=True)
    img = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colors = {tuple(c) for c in img[::7]}
    assert (31, 119, 180) in colors and (255, 127, 14) in colors
