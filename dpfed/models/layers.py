"""Convolutions as patches @ kernel: the same functions as `flax.linen.Conv`, fast in loops.

XLA:CPU runs convolutions inside loops (the federated engine's `while_loop`/`scan` over
clients and local steps, DP-SGD's `vmap` over examples, a `vmap` over DataLens teachers)
far slower than at top level, while matrix products keep their speed. Measured here (2 CPU
cores): a 3x3 conv gradient takes 14 ms at top level and 235 ms inside a `scan`; one
DP-FedAvg round of the benchmark CNN (64 clients x 5 local steps) takes 13.8 s with
`nn.Conv` and 1.72 s with `Conv` below (`benchmarks/fed_round.py --conv=xla,patches`).
Gathering the kh*kw shifted views of the input (im2col) and multiplying by the kernel is
the same function; at top level and forward only, `nn.Conv` stays faster on CPU.
On a GPU the patches win too: on one NVIDIA H200 (JAX 0.11.2, 2026-12-04) the same round
at 16 / 64 / 256 clients, all vmapped at once, took 7.5 / 30.5 / 134 ms with `nn.Conv`
(the clients' convolutions, each with its own kernel, become grouped convolutions) and
2.8 / 6.2 / 16.6 ms with `Conv`; the loop's single-client update was faster with `Conv`
as well. So `default_conv()` picks patches for CPU and GPU backends and XLA's convolution
on others (TPUs: not measured).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS: tuple[str, ...] = ("auto", "xla", "patches")


def extract_patches(
    x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int]
) -> jax.Array:
    """SAME-padded patches of `x` [B, H, W, C] -> [B, H', W', kh * kw * C] by strided slices.

    The last axis is ordered (kh, kw, C), matching a kernel [kh, kw, C, F] reshaped to
    [kh * kw * C, F]. Pure data movement (`lax.conv_general_dilated_patches` is a
    convolution with a one-hot kernel, as costly as the convolution it replaces).
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    _, height, width, _ = x.shape
    out_h, out_w = -(-height // sh), -(-width // sw)
    pad_h = max((out_h - 1) * sh + kh - height, 0)
    pad_w = max((out_w - 1) * sw + kw - width, 0)
    top, left = pad_h // 2, pad_w // 2
    x = jnp.pad(x, ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0)))
    slices = [
        x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(slices, axis=-1)


def conv_same(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """`nn.Conv(padding="SAME", strides=stride)` without its bias, as patches @ kernel."""
    kh, kw, channels, features = kernel.shape
    patches = extract_patches(x, (kh, kw), (stride, stride))
    return patches @ kernel.reshape((kh * kw * channels, features))


class Conv(nn.Module):
    """A SAME convolution with `nn.Conv`'s parameters, initialisers and auto-name.

    A drop-in for `nn.Conv(features, kernel_size, strides, padding="SAME")`: the same
    parameter tree (`kernel` [kh, kw, C, F], `bias` [F]), so checkpoints load either way.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv_same(x, kernel, self.strides) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (2, 2), strides=(2, 2))` on [..., H, W, C] as a reshape and a max.

    The same values (an odd last row or column is dropped, as VALID pooling does). Its
    gradient is an elementwise select, where `nn.max_pool`'s is XLA's select-and-scatter:
    in the benchmark CNN's DP-FedAvg round on an H200 (64 clients, patch convolutions) the
    pools' scatter and reduce-window kernels took 0.9 of the device's 4.8 ms busy time per
    round (a jax.profiler trace, `benchmarks/fed_round.py --profile_dir`); with this pool it
    was busy 3.8 ms and the round took 5.0 ms instead of 6.1. A vmapped CNN gradient on 2
    CPU cores is 1.1x to 1.5x faster with it (`benchmarks/max_pool.py`). A tie inside a
    window shares the gradient equally, where `nn.max_pool` gives it to the first maximum:
    both are subgradients, and tied values in a window almost always come from identical
    inputs, which then get the same total.
    """
    *lead, height, width, channels = x.shape
    x = x[..., : height - height % 2, : width - width % 2, :]
    x = x.reshape((*lead, height // 2, 2, width // 2, 2, channels))
    return x.max(axis=(-4, -2))


def default_conv() -> str:
    """"patches" on CPU and GPU backends (faster in loops and under vmap), else "xla"."""
    return "patches" if jax.default_backend() in ("cpu", "gpu") else "xla"


def resolve_conv(conv: str) -> str:
    """Maps "auto" to `default_conv()`; checks the name.

    Raises:
      ValueError: if `conv` is not one of `CONV_IMPLS`.
    """
    if conv not in CONV_IMPLS:
        raise ValueError(f"unknown conv {conv!r}; expected one of {', '.join(CONV_IMPLS)}")
    return default_conv() if conv == "auto" else conv
