"""Inception-v3 "pool3" features for the standard FID (`fid_inception`), from a weights file.

A JAX port of the FID Inception network (TensorFlow's 2015-12-05 Inception-v3 as used
by the original FID code, in the PyTorch port of pytorch-fid, `FIDInceptionA/C/E_1/E_2`):
images are repeated to 3 channels if grey (as DPDM does for MNIST), resized bilinearly to
299x299, scaled to [-1, 1], and the 2048-d average-pooled output of ``Mixed_7c`` is the
feature. Batch norms are folded into their convolutions (inference only).

The weights are never downloaded: the user passes an ``.npz`` whose arrays are the
PyTorch state dict of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` under its
own key names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
...). WORKSPACE.md ("Inception FID") says how to make that file on a machine with
internet. Extra keys (``fc.*``, ``num_batches_tracked``) are ignored.
"""

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from dpfed.eval.fid import FeatureExtractor

METRIC_NAME = "fid_inception"
FEATURE_DIM = 2048
IMAGE_SIZE = 299
_BN_EPS = 1e-3
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")

# name -> (in, out, kernel_h, kernel_w, stride, zero-padded); padding is (k_h//2, k_w//2).
ConvSpec = tuple[int, int, int, int, int, bool]
# Images per forward pass: memory grows with it (359 images on 2 CPU cores, one batch:
# 12.1 GB peak RSS; batches of 50: 2.2 GB, as fast, the same features; WORKSPACE.md).
BATCH_SIZE = 50


def _block_a(name: str, cin: int, pool: int) -> dict[str, ConvSpec]:
    return {
        f"{name}.branch1x1": (cin, 64, 1, 1, 1, True),
        f"{name}.branch5x5_1": (cin, 48, 1, 1, 1, True),
        f"{name}.branch5x5_2": (48, 64, 5, 5, 1, True),
        f"{name}.branch3x3dbl_1": (cin, 64, 1, 1, 1, True),
        f"{name}.branch3x3dbl_2": (64, 96, 3, 3, 1, True),
        f"{name}.branch3x3dbl_3": (96, 96, 3, 3, 1, True),
        f"{name}.branch_pool": (cin, pool, 1, 1, 1, True),
    }


def _block_b(name: str, cin: int) -> dict[str, ConvSpec]:
    return {
        f"{name}.branch3x3": (cin, 384, 3, 3, 2, False),
        f"{name}.branch3x3dbl_1": (cin, 64, 1, 1, 1, True),
        f"{name}.branch3x3dbl_2": (64, 96, 3, 3, 1, True),
        f"{name}.branch3x3dbl_3": (96, 96, 3, 3, 2, False),
    }


def _block_c(name: str, cin: int, c7: int) -> dict[str, ConvSpec]:
    return {
        f"{name}.branch1x1": (cin, 192, 1, 1, 1, True),
        f"{name}.branch7x7_1": (cin, c7, 1, 1, 1, True),
        f"{name}.branch7x7_2": (c7, c7, 1, 7, 1, True),
        f"{name}.branch7x7_3": (c7, 192, 7, 1, 1, True),
        f"{name}.branch7x7dbl_1": (cin, c7, 1, 1, 1, True),
        f"{name}.branch7x7dbl_2": (c7, c7, 7, 1, 1, True),
        f"{name}.branch7x7dbl_3": (c7, c7, 1, 7, 1, True),
        f"{name}.branch7x7dbl_4": (c7, c7, 7, 1, 1, True),
        f"{name}.branch7x7dbl_5": (c7, 192, 1, 7, 1, True),
        f"{name}.branch_pool": (cin, 192, 1, 1, 1, True),
    }


def _block_d(name: str, cin: int) -> dict[str, ConvSpec]:
    return {
        f"{name}.branch3x3_1": (cin, 192, 1, 1, 1, True),
        f"{name}.branch3x3_2": (192, 320, 3, 3, 2, False),
        f"{name}.branch7x7x3_1": (cin, 192, 1, 1, 1, True),
        f"{name}.branch7x7x3_2": (192, 192, 1, 7, 1, True),
        f"{name}.branch7x7x3_3": (192, 192, 7, 1, 1, True),
        f"{name}.branch7x7x3_4": (192, 192, 3, 3, 2, False),
    }


def _block_e(name: str, cin: int) -> dict[str, ConvSpec]:
    return {
        f"{name}.branch1x1": (cin, 320, 1, 1, 1, True),
        f"{name}.branch3x3_1": (cin, 384, 1, 1, 1, True),
        f"{name}.branch3x3_2a": (384, 384, 1, 3, 1, True),
        f"{name}.branch3x3_2b": (384, 384, 3, 1, 1, True),
        f"{name}.branch3x3dbl_1": (cin, 448, 1, 1, 1, True),
        f"{name}.branch3x3dbl_2": (448, 384, 3, 3, 1, True),
        f"{name}.branch3x3dbl_3a": (384, 384, 1, 3, 1, True),
        f"{name}.branch3x3dbl_3b": (384, 384, 3, 1, 1, True),
        f"{name}.branch_pool": (cin, 192, 1, 1, 1, True),
    }


CONVS: dict[str, ConvSpec] = {
    "Conv2d_1a_3x3": (3, 32, 3, 3, 2, False),
    "Conv2d_2a_3x3": (32, 32, 3, 3, 1, False),
    "Conv2d_2b_3x3": (32, 64, 3, 3, 1, True),
    "Conv2d_3b_1x1": (64, 80, 1, 1, 1, True),
    "Conv2d_4a_3x3": (80, 192, 3, 3, 1, False),
    **_block_a("Mixed_5b", 192, 32),
    **_block_a("Mixed_5c", 256, 64),
    **_block_a("Mixed_5d", 288, 64),
    **_block_b("Mixed_6a", 288),
    **_block_c("Mixed_6b", 768, 128),
    **_block_c("Mixed_6c", 768, 160),
    **_block_c("Mixed_6d", 768, 160),
    **_block_c("Mixed_6e", 768, 192),
    **_block_d("Mixed_7a", 768),
    **_block_e("Mixed_7b", 1280),
    **_block_e("Mixed_7c", 2048),
}


class WeightsError(ValueError):
    """The Inception weights file is missing or does not hold the expected arrays."""


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every array the weights file must hold, by PyTorch state-dict key."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout, kh, kw, _, _) in CONVS.items():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        shapes.update({f"{name}.bn.{key}": (cout,) for key in _BN_KEYS})
    return shapes


def fold_batch_norm(state: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (HWIO kernel * bn scale, bn shift)``: conv + inference BN as one conv."""
    folded = {}
    for name in CONVS:
        gamma, beta, mean, var = (state[f"{name}.bn.{key}"] for key in _BN_KEYS)
        scale = gamma / np.sqrt(var + _BN_EPS)
        kernel = np.transpose(state[f"{name}.conv.weight"], (2, 3, 1, 0)) * scale
        folded[name] = (kernel.astype(np.float32), (beta - mean * scale).astype(np.float32))
    return folded


def load_weights(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads and checks an ``.npz`` state dict; returns the folded convolutions.

    Raises:
      WeightsError: naming the file, and the first missing or misshapen array.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file (see WORKSPACE.md, 'Inception FID')")
    try:
        with np.load(path) as archive:
            state = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable .npz ({error})") from error
    for key, shape in expected_shapes().items():
        if key not in state:
            raise WeightsError(f"{path}: missing array {key!r} (is it pytorch-fid's FID model?)")
        if state[key].shape != shape:
            raise WeightsError(f"{path}: {key!r} has shape {state[key].shape}, expected {shape}")
    return fold_batch_norm(state)


def _conv(convs: dict, name: str, x: jax.Array) -> jax.Array:
    """Folded conv + ReLU (PyTorch's BasicConv2d)."""
    kernel, shift = convs[name]
    _, _, kh, kw, stride, padded = CONVS[name]
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if padded else ((0, 0), (0, 0))
    y = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.relu(y + shift)


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    strides = (1, stride, stride, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), strides, padding)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool that ignores the zero padding (TF's, as in pytorch-fid)."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    window = ((1, 3, 3, 1), (1, 1, 1, 1), padding)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window)
    counts = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, *window)
    return sums / counts


def _mixed_a(c: dict, name: str, x: jax.Array) -> jax.Array:
    b5 = _conv(c, f"{name}.branch5x5_2", _conv(c, f"{name}.branch5x5_1", x))
    b3 = _conv(c, f"{name}.branch3x3dbl_1", x)
    b3 = _conv(c, f"{name}.branch3x3dbl_3", _conv(c, f"{name}.branch3x3dbl_2", b3))
    pool = _conv(c, f"{name}.branch_pool", _avg_pool_same(x))
    return jnp.concatenate([_conv(c, f"{name}.branch1x1", x), b5, b3, pool], axis=-1)


def _mixed_b(c: dict, name: str, x: jax.Array) -> jax.Array:
    b3 = _conv(c, f"{name}.branch3x3", x)
    dbl = _conv(c, f"{name}.branch3x3dbl_1", x)
    dbl = _conv(c, f"{name}.branch3x3dbl_3", _conv(c, f"{name}.branch3x3dbl_2", dbl))
    return jnp.concatenate([b3, dbl, _max_pool(x, 2, 0)], axis=-1)


def _mixed_c(c: dict, name: str, x: jax.Array) -> jax.Array:
    b7 = x
    for i in (1, 2, 3):
        b7 = _conv(c, f"{name}.branch7x7_{i}", b7)
    dbl = x
    for i in (1, 2, 3, 4, 5):
        dbl = _conv(c, f"{name}.branch7x7dbl_{i}", dbl)
    pool = _conv(c, f"{name}.branch_pool", _avg_pool_same(x))
    return jnp.concatenate([_conv(c, f"{name}.branch1x1", x), b7, dbl, pool], axis=-1)


def _mixed_d(c: dict, name: str, x: jax.Array) -> jax.Array:
    b3 = _conv(c, f"{name}.branch3x3_2", _conv(c, f"{name}.branch3x3_1", x))
    b7 = x
    for i in (1, 2, 3, 4):
        b7 = _conv(c, f"{name}.branch7x7x3_{i}", b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


def _mixed_e(c: dict, name: str, x: jax.Array, max_pool_branch: bool) -> jax.Array:
    b3_in = _conv(c, f"{name}.branch3x3_1", x)
    b3 = [_conv(c, f"{name}.branch3x3_2{s}", b3_in) for s in "ab"]
    dbl_in = _conv(c, f"{name}.branch3x3dbl_2", _conv(c, f"{name}.branch3x3dbl_1", x))
    dbl = [_conv(c, f"{name}.branch3x3dbl_3{s}", dbl_in) for s in "ab"]
    # pytorch-fid's FIDInceptionE_2 (Mixed_7c) max-pools here, as TF's FID graph does.
    pooled = _max_pool(x, 1, 1) if max_pool_branch else _avg_pool_same(x)
    pool = _conv(c, f"{name}.branch_pool", pooled)
    return jnp.concatenate([_conv(c, f"{name}.branch1x1", x), *b3, *dbl, pool], axis=-1)


def pool3_features(convs: dict, images: jax.Array, image_size: int = IMAGE_SIZE) -> jax.Array:
    """The 2048-d pool3 features of images ``[N, H, W, 1 or 3]`` in [0, 1].

    Raises:
      ValueError: if ``images`` are not ``[N, H, W, 1 or 3]`` (e.g. channels-first, which
        the resize to 299x299 would otherwise silently resize along the wrong axes).
    """
    shape = jnp.shape(images)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3] (channels last), got {shape}")
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), "bilinear", antialias=False)
    x = 2 * x - 1
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _conv(convs, name, x)
    x = _max_pool(x, 2, 0)
    x = _conv(convs, "Conv2d_4a_3x3", _conv(convs, "Conv2d_3b_1x1", x))
    x = _max_pool(x, 2, 0)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _mixed_a(convs, name, x)
    x = _mixed_b(convs, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _mixed_c(convs, name, x)
    x = _mixed_d(convs, "Mixed_7a", x)
    x = _mixed_e(convs, "Mixed_7b", x, max_pool_branch=False)
    x = _mixed_e(convs, "Mixed_7c", x, max_pool_branch=True)
    return x.mean(axis=(1, 2))


def inception_extractor(
    weights_path: str | os.PathLike, image_size: int = IMAGE_SIZE
) -> FeatureExtractor:
    """The `fid_inception` extractor from a weights file (see the module docstring).

    Raises:
      WeightsError: if the file is missing or malformed.
    """
    convs = jax.tree.map(jnp.asarray, load_weights(weights_path))
    jitted = jax.jit(pool3_features, static_argnames="image_size")
    features = functools.partial(jitted, convs, image_size=image_size)
    description = (
        f"Inception-v3 pool3 ({FEATURE_DIM}-d, FID weights 2015-12-05 from "
        f"{pathlib.Path(weights_path).name}; images resized to {image_size}x{image_size})"
    )
    return FeatureExtractor(METRIC_NAME, description, features, BATCH_SIZE)
