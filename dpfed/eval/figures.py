"""PNG figures for reports: per-class sample grids, real vs synthetic, training curves.

Uses matplotlib's object API (`Figure` renders with Agg), so nothing touches pyplot's
global state or needs a display.
"""

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from dpfed.train import workdir as workdir_lib

_GAP = 1  # pixels of grey between tiles


def _save(figure: Figure, path: str | os.PathLike) -> None:
    """Writes `figure` as a PNG atomically (a killed run leaves the old file or the new)."""
    workdir_lib.atomic_write_with(path, lambda f: figure.savefig(f, format="png", dpi=100))


def tile(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Tiles up to ``rows * cols`` images ``[N, H, W, C]`` row by row into one
    ``[rows*(H+gap)-gap, cols*(W+gap)-gap, C]`` image; missing tiles stay grey."""
    _, height, width, channels = images.shape
    canvas = np.full(
        (rows * (height + _GAP) - _GAP, cols * (width + _GAP) - _GAP, channels),
        0.5,
        np.float32,
    )
    for i, image in enumerate(images[: rows * cols]):
        top, left = (i // cols) * (height + _GAP), (i % cols) * (width + _GAP)
        canvas[top : top + height, left : left + width] = image
    return canvas


def class_grid(
    images: np.ndarray, labels: np.ndarray | None, num_classes: int, per_class: int
) -> np.ndarray:
    """One row per class holding its first ``per_class`` images (a short row is padded
    grey); unlabelled images fill ``num_classes`` rows in order."""
    if labels is None:
        return tile(images, num_classes, per_class)
    _, height, width, channels = images.shape
    rows = []
    for label in range(num_classes):
        chosen = images[np.asarray(labels) == label][:per_class]
        padded = np.full((per_class, height, width, channels), 0.5, np.float32)
        padded[: len(chosen)] = chosen
        rows.append(padded)
    return tile(np.concatenate(rows), num_classes, per_class)


def _show(axes, grid: np.ndarray, title: str, num_rows: int, labelled: bool) -> None:
    if grid.shape[-1] == 1:
        axes.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axes.imshow(np.clip(grid, 0.0, 1.0), interpolation="nearest")
    axes.set_title(title)
    axes.set_xticks([])
    if labelled:
        row_height = (grid.shape[0] + _GAP) / num_rows
        axes.set_yticks([row_height * (r + 0.5) for r in range(num_rows)], range(num_rows))
        axes.set_ylabel("class")
    else:
        axes.set_yticks([])


def _panel_inches(grid: np.ndarray) -> tuple[float, float]:
    scale = 5.0 / max(grid.shape[:2])
    return grid.shape[1] * scale, grid.shape[0] * scale


def save_class_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int,
    title: str,
    per_class: int = 10,
) -> None:
    """Writes a PNG of `class_grid` with the class of each row on the y axis."""
    grid = class_grid(images, labels, num_classes, per_class)
    width, height = _panel_inches(grid)
    figure = Figure(figsize=(width + 1.0, height + 0.8), layout="constrained")
    _show(figure.add_subplot(), grid, title, num_classes, labels is not None)
    _save(figure, path)


def save_side_by_side(
    path: str | os.PathLike,
    real: tuple[np.ndarray, np.ndarray],
    synthetic: tuple[np.ndarray, np.ndarray | None],
    num_classes: int,
    titles: tuple[str, str] = ("real", "synthetic"),
    per_class: int = 8,
) -> None:
    """Writes a PNG with the real and the synthetic class grids next to each other."""
    grids = [class_grid(*pair, num_classes, per_class) for pair in (real, synthetic)]
    width, height = _panel_inches(grids[0])
    figure = Figure(figsize=(2 * width + 1.5, height + 0.8), layout="constrained")
    for axes, grid, title, labels in zip(
        figure.subplots(1, 2), grids, titles, (real[1], synthetic[1]), strict=True
    ):
        _show(axes, grid, title, num_classes, labels is not None)
    _save(figure, path)


def curve_groups(records: Sequence[dict], x_key: str) -> dict[str, list[str]]:
    """Numeric keys of ``records`` grouped into panels: losses, accuracies, epsilon."""
    keys = sorted(
        {
            key
            for record in records
            for key, value in record.items()
            if key != x_key and isinstance(value, int | float) and not isinstance(value, bool)
        }
    )
    groups = {
        "loss": [k for k in keys if "loss" in k],
        "accuracy": [k for k in keys if "acc" in k],
        "epsilon": [k for k in keys if k.startswith("eps")],
    }
    return {name: members for name, members in groups.items() if members}


def save_curves(path: str | os.PathLike, records: Sequence[dict], title: str) -> bool:
    """Writes loss / accuracy / eps vs step (or round) panels from metrics records.

    Returns:
      False (and writes nothing) when the records have no step axis or nothing to plot.
    """
    x_key = next((k for k in ("step", "round") if any(k in r for r in records)), None)
    groups = curve_groups(records, x_key) if x_key else {}
    if not groups:
        return False
    figure = Figure(figsize=(4.0 * len(groups), 3.2), layout="constrained")
    figure.suptitle(title)
    for axes, (name, keys) in zip(
        np.atleast_1d(figure.subplots(1, len(groups))), groups.items(), strict=True
    ):
        for key in keys:
            points = [(r[x_key], r[key]) for r in records if x_key in r and key in r]
            points = [(x, y) for x, y in points if isinstance(y, int | float)]
            axes.plot(*zip(*points, strict=True), marker=".", label=key)
        axes.set_xlabel(x_key)
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    _save(figure, path)
    return True
