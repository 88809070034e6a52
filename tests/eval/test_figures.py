"""Tests for dpfed.eval.figures: grids and PNG plots."""

import os

import numpy as np
import pytest
from PIL import Image

from dpfed.eval import figures


def test_class_grid_puts_each_class_in_its_row():
    labels = np.array([2, 0, 1, 2, 0], np.int32)
    images = np.broadcast_to((labels / 10.0)[:, None, None, None], (5, 3, 3, 1)).astype(np.float32)
    grid = figures.class_grid(images, labels, num_classes=3, per_class=2)
    row_values = [grid[r * 4 + 1, 1, 0] for r in range(3)]  # tile height 3 + 1 px gap
    np.testing.assert_allclose(row_values, [0.0, 0.1, 0.2], err_msg="rows are not classes 0,1,2")


def test_class_grid_pads_short_rows_grey():
    images = np.zeros((1, 2, 2, 1), np.float32)
    grid = figures.class_grid(images, np.array([0]), num_classes=2, per_class=2)
    assert grid[3:, :, 0].min() == 0.5, "a class without images should be a grey row"


def test_save_class_grid_writes_a_png(tmp_path):
    images = np.random.default_rng(0).uniform(size=(30, 8, 8, 1)).astype(np.float32)
    path = tmp_path / "grid.png"
    figures.save_class_grid(path, images, np.arange(30) % 10, 10, title="samples")
    assert Image.open(path).format == "PNG", "the grid is not a PNG"


def test_a_failed_figure_write_keeps_the_old_png(tmp_path, monkeypatch):
    # Figures were written in place: a kill mid-write left a torn PNG.
    images = np.zeros((10, 8, 8, 1), np.float32)
    path = tmp_path / "grid.png"
    figures.save_class_grid(path, images, np.arange(10), 10, title="a")
    before = path.read_bytes()

    def crash(*args):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        figures.save_class_grid(path, images + 1, np.arange(10), 10, title="b")
    assert path.read_bytes() == before, "a failed write must leave the old figure whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"], "a temp file was left"


def test_side_by_side_accepts_unlabelled_synthetic(tmp_path):
    real = np.zeros((20, 8, 8, 1), np.float32), np.arange(20) % 10
    synthetic = np.ones((20, 8, 8, 1), np.float32), None
    path = tmp_path / "side.png"
    figures.save_side_by_side(path, real, synthetic, 10)
    assert path.exists(), "no side-by-side figure written"


def test_curve_groups_split_loss_accuracy_and_eps():
    records = [{"step": 1, "loss": 2.0, "test_accuracy": 0.1, "epsilon_rdp": 0.5, "tag": "x"}]
    groups = figures.curve_groups(records, "step")
    expected = {"loss": ["loss"], "accuracy": ["test_accuracy"], "epsilon": ["epsilon_rdp"]}
    assert groups == expected, f"wrong panels: {groups}"


def test_save_curves_skips_records_without_steps(tmp_path):
    path = tmp_path / "curves.png"
    assert not figures.save_curves(path, [{"loss": 1.0}], "t"), "plotted without a step axis"
    assert not path.exists(), "an empty plot was written"


def test_save_curves_plots_eps_vs_step(tmp_path):
    records = [{"step": s, "loss": 1 / s, "epsilon_rdp": 0.1 * s} for s in range(1, 6)]
    path = tmp_path / "curves.png"
    assert figures.save_curves(path, records, "training") and path.exists(), "no curves written"
