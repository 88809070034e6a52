"""The quantitative bug signal of the image demo: which images are inverted.

In "Generative Models for Effective ML on Private, Decentralized Datasets" (Augenstein
et al., ICLR 2020) the modeler looks at the GAN's samples and sees inverted digits.
Here that look is also a number: the fraction of generated samples whose polarity is
inverted (white background, black ink).

The check is the brightness of the image's frame. MNIST and EMNIST centre each
character in a 20x20 box inside the 28x28 image (EMNIST repeats MNIST's conversion,
Cohen et al. 2017), so the outer frame is background: black in healthy images, white
in inverted ones. On the 5,000 embedded mnist5k digits the mean brightness of the
2-pixel frame (208 pixels) is at most 0.036 on a [0, 1] scale, so their inversions are
at least 0.964: a threshold at mid-range separates them with a margin of ~0.46 either
side. The mean over the whole frame is robust to the blur and speckle of GAN samples;
a sample is called inverted only if more than half of its frame's intensity range is
lit. No model is trained, so the check cannot itself be fooled by what a polarity
classifier might key on (stroke width, digit shape).
"""

from __future__ import annotations

import numpy as np

BORDER_WIDTH = 2
THRESHOLD = 0.5  # on the [0, 1]-normalised frame brightness


def border_brightness(
    images: np.ndarray, border: int = BORDER_WIDTH, value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """Mean brightness `[N]` of each image's outer frame of `border` pixels, in [0, 1].

    Args:
      images: `[N, H, W]` or `[N, H, W, C]` (channels are averaged).
      border: width of the frame in pixels.
      value_range: the images' (black, white) values, e.g. (-1, 1) for GAN outputs.
    """
    images = np.asarray(images, np.float64)
    if images.ndim == 4:
        images = images.mean(axis=-1)
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
    height, width = images.shape[1:]
    if not 0 < 2 * border < min(height, width):
        raise ValueError(f"border must be in [1, {(min(height, width) - 1) // 2}], got {border}")
    frame = np.ones((height, width), bool)
    frame[border:-border, border:-border] = False
    lo, hi = value_range
    return (images[:, frame].mean(axis=1) - lo) / (hi - lo)


def is_inverted(
    images: np.ndarray, border: int = BORDER_WIDTH, value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """Bool `[N]`: the image's frame is mostly bright (white background)."""
    return border_brightness(images, border, value_range) > THRESHOLD


def inverted_fraction(
    images: np.ndarray, border: int = BORDER_WIDTH, value_range: tuple[float, float] = (0.0, 1.0)
) -> float:
    """The fraction of `images` whose polarity is inverted (see the module docstring)."""
    return float(np.mean(is_inverted(images, border, value_range)))
