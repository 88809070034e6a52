"""Simulated data-pipeline bugs on a fraction of clients, the ones the P0 models reveal.

"Generative Models for Effective ML on Private, Decentralized Datasets" (Augenstein et
al., ICLR 2020) debugs federated data the modeler cannot look at:
- images: after an app update some devices feed *inverted* images (black and white
  swapped: x -> -x in [-1, 1], i.e. x -> 1 - x in [0, 1]);
- text: some clients' pipelines tokenize wrongly, so concatenated tokens appear.
Each injector picks exactly round(fraction * clients) buggy clients at random (seeded)
and returns the mask of those clients, so experiments can check what a model found.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from dpfed.data.partition import FederatedData

PUNCTUATION = ",.;:!?"


def invert_images(images: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Swaps black and white: x -> lo + hi - x (1 - x in [0, 1], -x in [-1, 1])."""
    lo, hi = value_range
    return (lo + hi) - np.asarray(images)


def choose_buggy_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """Bool `[num_clients]`: exactly round(fraction * num_clients) True, at random."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    chosen = np.random.default_rng(seed).permutation(num_clients)[: round(fraction * num_clients)]
    mask = np.zeros(num_clients, dtype=bool)
    mask[chosen] = True
    return mask


def inject_inversion(
    fed_data: FederatedData,
    fraction: float,
    seed: int,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> tuple[FederatedData, np.ndarray]:
    """Inverts every real image of a random `fraction` of the clients.

    Padding slots stay as they were (zeros), so masks keep ignoring them.

    Args:
      fed_data: client images in `value_range` (dpfed datasets are in [0, 1]).
      fraction: the fraction p of clients whose images are all inverted.
      seed: picks the buggy clients.
      value_range: the images' (black, white) values.

    Returns:
      (the data with the bug, bool `[clients]` mask of the buggy clients).

    Raises:
      ValueError: a real image value outside `value_range` (inverting it would leave the
        range, or wrap around in an integer dtype), or a range with lo >= hi.
    """
    lo, hi = value_range
    if not lo < hi:
        raise ValueError(
            f"value_range must be (black, white) with black < white, got {value_range}")
    real = np.asarray(fed_data.images)[fed_data.mask]
    if real.size and (real.min() < lo or real.max() > hi):
        raise ValueError(
            f"images lie in [{real.min()}, {real.max()}], outside value_range {value_range}: "
            "pass the images' range")
    buggy = choose_buggy_clients(fed_data.num_clients, fraction, seed)
    invert = buggy[:, None] & fed_data.mask  # [clients, max_n]: real slots of buggy clients
    invert = invert.reshape(invert.shape + (1,) * (fed_data.images.ndim - 2))
    images = np.where(invert, invert_images(fed_data.images, value_range), fed_data.images)
    return dataclasses.replace(fed_data, images=images.astype(fed_data.images.dtype)), buggy


_SPACE_AFTER_PUNCTUATION = re.compile(f"([{re.escape(PUNCTUATION)}]) +")


def drop_space_after_punctuation(text: str) -> str:
    """The text bug: a client normaliser that deletes the spaces after punctuation.

    "My lord, what say you? I am here." -> "My lord,what say you?I am here.". A
    whitespace tokenizer then yields concatenated tokens such as "lord,what".
    """
    return _SPACE_AFTER_PUNCTUATION.sub(r"\1", text)


def inject_text_bug(
    texts: Sequence[str],
    fraction: float,
    seed: int,
    bug: Callable[[str], str] = drop_space_after_punctuation,
) -> tuple[list[str], np.ndarray]:
    """Applies `bug` to the texts of a random `fraction` of the clients.

    Returns:
      (the clients' texts with the bug, bool `[clients]` mask of the buggy clients).
    """
    buggy = choose_buggy_clients(len(texts), fraction, seed)
    return [
        bug(text) if is_buggy else text for text, is_buggy in zip(texts, buggy, strict=True)
    ], buggy
