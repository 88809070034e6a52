"""Clipped per-example gradient sums without `vmap(grad)`, for Dense/Conv networks.

`clipped_grad_sum` (dpfed.privacy.clipping) materialises every per-example gradient
with `vmap(grad)`. For a convolution that turns XLA's batched weight-gradient into a
grouped convolution per example, which XLA's CPU backend runs slowly. Here the batch
goes through the model ONCE, batched as in non-private training, and per-example
gradient norms come from each layer's input activations `a` and output gradients
`g = dL/dy` (Goodfellow 2015, "Efficient per-example gradient computations"):

- Dense: the per-example kernel gradient is `sum_t a_t g_t^T`; its squared norm is
  `|a|^2 |g|^2` for one token, else either the "ghost norm"
  `sum_{t,s} (a_t . a_s)(g_t . g_s)` (Li et al. 2022, "Large Language Models Can Be
  Strong Differentially Private Learners") or the materialised per-example gradient,
  whichever is cheaper (Bu et al. 2022, "Scalable and Efficient Training of Large
  Convolutional Neural Networks with Differential Privacy": mixed ghost clipping).
- Conv: the same, on the im2col patches of the input (built by strided slices).

Per-example gradients exist only one layer at a time inside the norm computation, and
only where that is cheaper than the ghost norm. Where a layer's tokens' terms cancel,
float32 rounding can make either norm far too small, so the clip uses an upper bound
that allows for it (`kernel_norm_bound`). The clipped sum is then
`sum_b s_b grad_b` with `s_b = min(1, C / |grad_b|) mask_b`, formed per layer as ONE
batched weight gradient at the scaled output gradients `s * g` (the book-keeping trick
of Bu et al. 2023, "Differentially Private Optimization on Large Model at Small
Cost"): no second backward pass through the model.

The output gradients are obtained by adding a zero perturbation to every Dense/Conv
output (via `flax.linen.intercept_methods`) and differentiating the summed loss with
respect to those perturbations only. Requirements, checked where possible:
- every parameter belongs to an `nn.Dense` or `nn.Conv` (shared weights, one feature
  group, no weight mask or input dilation, padding SAME/VALID/explicit) called exactly
  once, outside lifted transforms (`nn.vmap`, `nn.scan`), and is used by the loss only
  through that layer (no weight tying by reading `params` elsewhere: such a use would
  escape clipping, and cannot be detected here);
- the leading axis of every such layer's input is the example axis, and examples do
  not interact (no BatchNorm): the per-example loss of example b depends on example
  b only. The traced pass cannot see a mix; `check_examples_independent` looks for one
  in forward-mode passes on real params and a real batch, once before training (the
  DP-SGD trainer calls it). Tests compare against `clipped_grad_sum`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpfed.privacy.clipping import ClippedSum, clip_scales, where_kept

PyTree = Any
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}
_UNIT_ROUNDOFF = 2.0**-24  # float32
# The clipping's own products run in full float32 on every backend: XLA:GPU's default
# rounds float32 products to TF32 (10 mantissa bits), which the norms' error bounds and
# the clip would not hold to.
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class _Layer:
    path: tuple[str, ...]  # the module's path inside the "params" collection
    module: nn.Module
    inputs: jax.Array
    outputs: jax.Array


class _Tape:
    """Method interceptor: records Dense/Conv inputs and adds perturbations to outputs."""

    def __init__(self, perturbations: list[jax.Array] | None = None):
        self.perturbations = perturbations
        self.layers: list[_Layer] = []

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.Conv):
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        outputs = next_fun(*args, **kwargs)
        if self.perturbations is not None:
            outputs = outputs + self.perturbations[len(self.layers)]
        self.layers.append(_Layer(tuple(module.scope.path), module, inputs, outputs))
        return outputs


def clipped_grad_sum_fast(
    batch_loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    l2_clip: float,
) -> ClippedSum:
    """The same `ClippedSum` as `clipped_grad_sum`, from one batched forward/backward.

    Args:
      batch_loss_fn: `batch_loss_fn(params, batch) -> [B]` per-example losses, computed
        by ONE batched call of a Flax model (e.g. `model.apply(params, images)`) whose
        parameters all live in `nn.Dense` / `nn.Conv` layers.
      params: the model variables as passed to `model.apply`; gradients are taken with
        respect to the "params" collection and returned in the same structure.
      batch: pytree of arrays with a leading batch axis B.
      mask: [B] bool or {0,1}; padded examples (mask 0) contribute exactly nothing.
      l2_clip: the clip norm C (> 0 and finite).

    Returns:
      ClippedSum with the summed clipped gradient and the [B] per-example norms before
      clipping (0 where masked): upper bounds that allow for float32 rounding
      (`kernel_norm_bound`), above the vmap path's norms by 1e-5 to 3e-4 relative for
      the CNN on real images.

    Raises:
      ValueError / NotImplementedError: a parameter outside a supported layer, a layer
        called twice, an unsupported layer option, or a layer input whose leading axis
        is not the batch axis. Examples whose losses mix are NOT detected here: call
        `check_examples_independent` once before training.
    """
    if not 0 < l2_clip < math.inf:
        raise ValueError(f"l2_clip must be > 0 and finite, got {l2_clip}")
    batch_size = mask.shape[0]

    def summed_loss(perturbations):
        losses, layers = _run(batch_loss_fn, params, batch, perturbations)
        return jnp.sum(losses), [layer.inputs for layer in layers]

    recorded = _record_layers(batch_loss_fn, params, batch)
    _check_layers(recorded, batch_size)
    zeros = _zero_perturbations(recorded)
    output_grads, inputs = jax.grad(summed_loss, has_aux=True)(zeros)
    layers = [dataclasses.replace(r, inputs=x) for r, x in zip(recorded, inputs, strict=True)]

    output_grads = [
        g.reshape(batch_size, -1, g.shape[-1]).astype(jnp.float32) for g in output_grads
    ]
    sq_norms = sum(
        _sq_norm_bound(_layer_factors(layer), grads, layer.module.use_bias)
        for layer, grads in zip(layers, output_grads, strict=True)
    )
    norms = jnp.sqrt(sq_norms)
    scale = clip_scales(norms, mask, l2_clip)  # 0 for padded and non-finite examples

    sums: dict[tuple[str, ...], jax.Array] = {}
    for layer, grads in zip(layers, output_grads, strict=True):
        scaled = where_kept(scale, grads) * scale[:, None, None]
        layer = dataclasses.replace(layer, inputs=where_kept(scale, layer.inputs))
        sums[layer.path + ("kernel",)] = _kernel_grad_sum(layer, scaled)
        if layer.module.use_bias:
            sums[layer.path + ("bias",)] = jnp.sum(scaled, axis=(0, 1))
    return ClippedSum(_assemble(sums, params), jnp.where(mask > 0, norms, 0.0))


def _run(
    batch_loss_fn: Callable, params: PyTree, batch: PyTree, perturbations: list | None
) -> tuple[jax.Array, list[_Layer]]:
    """The per-example losses, with `perturbations` added to the Dense/Conv outputs."""
    tape = _Tape(perturbations)
    with nn.intercept_methods(tape):
        losses = batch_loss_fn(params, batch)
    return losses, tape.layers


def _record_layers(batch_loss_fn: Callable, params: PyTree, batch: PyTree) -> list[_Layer]:
    """The Dense/Conv layers the loss calls, with abstract inputs and outputs (no FLOPs)."""
    recorded: list[_Layer] = []

    def probe():
        recorded.extend(_run(batch_loss_fn, params, batch, None)[1])
        return [(layer.inputs, layer.outputs) for layer in recorded]

    shapes = jax.eval_shape(probe)
    return [
        dataclasses.replace(r, inputs=x, outputs=y)
        for r, (x, y) in zip(recorded, shapes, strict=True)
    ]


def _zero_perturbations(layers: list[_Layer]) -> list[jax.Array]:
    return [jnp.zeros(layer.outputs.shape, layer.outputs.dtype) for layer in layers]


def check_examples_independent(
    batch_loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    seed: int = 0,
) -> None:
    """Raises ValueError where one example's loss moves with another example's values.

    `clipped_grad_sum_fast` computes per-example norms only if example b's loss depends
    on example b alone; a layer that mixes examples (BatchNorm on batch statistics, a
    batch mean in the loss) makes its norms and its clip wrong, and nothing in the fast
    path itself can see it. Call this once, with the params and a batch of the shape
    training uses, before training with the fast path.

    For each bit k of the example index and each side (set, clear), two passes touch
    the examples on that side only, and every other example's loss must not move:
    - forward mode: random tangents on the float leaves of `batch` and on every
      Dense/Conv output; the other examples' loss tangents must be exactly 0 (a path
      that does not mix examples carries exact zeros);
    - values: the side's examples take the values of their neighbours in the batch
      (every leaf, integer ones too, rolled by one); the other examples' losses must be
      bit-identical. This sees what has no derivative: `stop_gradient` on batch
      statistics, masks from comparisons, a loss weighted by the batch's label counts.
    Every ordered pair of examples differs in some bit, so 4 ceil(log2 B) passes find
    any pair joined by a path with a non-zero derivative at these params, or whose
    values move these losses. Not found: a dependence that neither a tangent nor these
    particular values reveal (e.g. a gate that is exactly zero at these params). A NaN
    tangent counts as a move (it can come from an example's own primal, e.g. sqrt at 0:
    then the check refuses a model that does not mix; `clipped_grad_sum` remains).

    Raises:
      ValueError: an example's loss moves with other examples (the message names one),
        the losses are not finite (then nothing can be concluded), a layer's input does
        not lead with the batch axis, or the leaves of `batch` do not share one.
      NotImplementedError: a layer the fast path does not support (`_check_layers`).
    """
    leaves, treedef = jax.tree.flatten(batch)
    batch_size = leaves[0].shape[0] if leaves else 0
    if any(leaf.ndim == 0 or leaf.shape[0] != batch_size for leaf in leaves):
        raise ValueError("every leaf of the batch needs the same leading batch axis")
    if batch_size < 2:
        return
    floating = [jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves]
    layers = _record_layers(batch_loss_fn, params, batch)
    _check_layers(layers, batch_size)

    def losses(params, float_leaves, other_leaves, perturbations):
        floats, others = iter(float_leaves), iter(other_leaves)
        full = [next(floats) if f else next(others) for f in floating]
        return _run(batch_loss_fn, params, jax.tree.unflatten(treedef, full), perturbations)[0]

    @jax.jit
    def loss_tangents(params, float_leaves, other_leaves, side, key):
        primals = (float_leaves, _zero_perturbations(layers))
        keys = iter(jax.random.split(key, len(primals[0]) + len(primals[1])))

        def tangent(x):
            return jnp.where(_on_side(side, x), jax.random.normal(next(keys), x.shape, x.dtype), 0)

        tangents = jax.tree.map(tangent, primals)
        return jax.jvp(lambda f, p: losses(params, f, other_leaves, p), primals, tangents)

    @jax.jit
    def losses_with_side_rolled(params, leaves, side):
        def rolled(x):
            return jnp.where(_on_side(side, x), jnp.roll(x, 1, axis=0), x)

        batch = jax.tree.unflatten(treedef, [rolled(x) for x in leaves])
        return _run(batch_loss_fn, params, batch, None)[0]

    float_leaves = [leaf for leaf, f in zip(leaves, floating, strict=True) if f]
    other_leaves = [leaf for leaf, f in zip(leaves, floating, strict=True) if not f]
    index = np.arange(batch_size)
    key = jax.random.key(seed)
    # The same program as the rolled passes (the side is an argument), so that only the
    # values can differ, not the rounding of another fusion.
    base = np.asarray(losses_with_side_rolled(params, leaves, jnp.zeros(batch_size, bool)))
    for bit in range((batch_size - 1).bit_length()):
        for value in (1, 0):
            side = (index >> bit) & 1 == value
            side_key = jax.random.fold_in(key, 2 * bit + value)
            values, moved = loss_tangents(
                params, float_leaves, other_leaves, jnp.asarray(side), side_key
            )
            values = np.asarray(values)
            if not np.all(np.isfinite(values)):
                raise ValueError("the losses are not finite: independence cannot be checked")
            changed = np.asarray(losses_with_side_rolled(params, leaves, jnp.asarray(side)))
            moved = np.asarray(moved)
            hit = np.flatnonzero(~side & (~(moved == 0) | (changed != base)))
            if hit.size:
                sources = np.flatnonzero(side)
                raise ValueError(
                    f"example {hit[0]}'s loss moves with the values of other examples (of "
                    f"{sources.tolist()[:8]}{'...' if sources.size > 8 else ''}): a layer or loss "
                    "mixes examples (e.g. BatchNorm on batch statistics), so per-example "
                    "norms from one batched pass are not the examples' own; use the "
                    "per-example clipping (clipping='vmap')"
                )


def _on_side(side: jax.Array, x: jax.Array) -> jax.Array:
    """The [B] mask `side` shaped to broadcast over `x`'s per-example axes."""
    return side.reshape(side.shape + (1,) * (x.ndim - 1))


def _layer_factors(layer: _Layer) -> jax.Array:
    """[B, T, K] per-example inputs whose contraction with the [B, T, O] output grads is
    the per-example kernel gradient (K = Din for Dense, prod(kernel) * Cin for Conv)."""
    x = layer.inputs.astype(jnp.float32)
    if isinstance(layer.module, nn.Dense):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    return _patches(x, _ConvSpec.of(layer))


@dataclasses.dataclass(frozen=True)
class _ConvSpec:
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | list[tuple[int, int]]
    dilation: tuple[int, ...]

    @staticmethod
    def of(layer: _Layer) -> _ConvSpec:
        module = layer.module
        kernel_size = _tuple(module.kernel_size, None)
        rank = len(kernel_size)
        return _ConvSpec(
            kernel_size,
            _tuple(module.strides, rank),
            _lax_padding(module.padding, rank),
            _tuple(module.kernel_dilation, rank),
        )

    def dimension_numbers(self) -> tuple[str, str, str]:
        spatial = _SPATIAL[len(self.kernel_size)]
        return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


def _patches(x: jax.Array, spec: _ConvSpec) -> jax.Array:
    """im2col by strided slices: [B, positions, prod(kernel) * Cin], in the kernel's
    (*window, Cin) order. (`lax.conv_general_dilated_patches` runs an identity-kernel
    convolution instead, which is slower on CPU.)"""
    window = [(k - 1) * d + 1 for k, d in zip(spec.kernel_size, spec.dilation, strict=True)]
    pads = spec.padding
    if isinstance(pads, str):
        pads = jax.lax.padtype_to_pads(x.shape[1:-1], window, spec.strides, pads)
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(n - w) // s + 1 for n, w, s in zip(x.shape[1:-1], window, spec.strides, strict=True)]
    slices = []
    for offset in itertools.product(*(range(k) for k in spec.kernel_size)):
        index = tuple(
            slice(o * d, o * d + (m - 1) * s + 1, s)
            for o, d, m, s in zip(offset, spec.dilation, out, spec.strides, strict=True)
        )
        slices.append(x[(slice(None), *index)])
    patches = jnp.stack(slices, axis=-2)  # [B, *out, prod(kernel), Cin]
    return patches.reshape(x.shape[0], -1, len(slices) * x.shape[-1])


def _sq_norm_bound(inputs: jax.Array, grads: jax.Array, bias: bool) -> jax.Array:
    """[B] upper bounds on the squared norms of one layer's per-example gradients
    (kernel + bias), by `kernel_norm_bound`'s rule."""
    grads = grads.astype(jnp.float32)
    sq = jnp.square(kernel_norm_bound(inputs, grads))
    if bias:  # the bias gradient sum_t g_t is the kernel gradient of inputs all 1
        tokens = grads.shape[1]
        bias_norm = jnp.sqrt(jnp.sum(jnp.square(jnp.sum(grads, axis=1)), axis=-1))
        if tokens > 1:
            bias_norm = bias_norm + 2 * _gamma(tokens + 1) * jnp.sum(_row_norms(grads), axis=1)
        sq = sq + jnp.square(bias_norm)
    return sq


def _ghost_is_cheaper(tokens: int, k: int, out: int) -> bool:
    """The ghost norm costs less, and its error bound (kernel_norm_bound) is usable."""
    bounded = (k + out + tokens * tokens) * _UNIT_ROUNDOFF < 0.5
    return bounded and tokens * tokens * (k + out) < tokens * k * out


def kernel_sq_norms(inputs: jax.Array, grads: jax.Array, ghost: bool | None = None) -> jax.Array:
    """[B] squared Frobenius norms of `sum_t inputs[b, t] grads[b, t]^T`, in float32.

    `ghost` None picks the cheaper of the ghost norm (cost ~ T^2 (K + O)) and the
    materialised per-example product (cost ~ T K O); both give the same value up to
    rounding. Rounding can make them far too small when the tokens' terms cancel:
    clipping uses `kernel_norm_bound`.
    """
    _, tokens, k = inputs.shape
    out = grads.shape[-1]
    if tokens == 1:
        return jnp.sum(jnp.square(inputs[:, 0]), -1) * jnp.sum(jnp.square(grads[:, 0]), -1)
    if ghost is None:
        ghost = _ghost_is_cheaper(tokens, k, out)
    if ghost:
        gram_a = jnp.einsum("btk,bsk->bts", inputs, inputs, precision=_EXACT)
        gram_g = jnp.einsum("bto,bso->bts", grads, grads, precision=_EXACT)
        return jnp.sum(gram_a * gram_g, axis=(1, 2))
    per_example = jnp.einsum("bto,btk->bok", grads, inputs, precision=_EXACT)
    return jnp.sum(jnp.square(per_example), axis=(1, 2))


def kernel_norm_bound(inputs: jax.Array, grads: jax.Array, ghost: bool | None = None) -> jax.Array:
    """[B] upper bounds on the Frobenius norms of `sum_t inputs[b, t] grads[b, t]^T`,
    and on the norm of each example's share of the batched weight gradient formed from
    the same factors in another order (the clipped sum's pass).

    With T > 1 tokens the terms `a_t g_t^T` can cancel: each float32 sum then errs by
    up to ~n u (u = 2^-24) times the sum of its terms' magnitudes, which can exceed the
    exact norm by any factor (WORKSPACE.md, "The privacy ledger", gives measured
    contributions of 11.7 C through the ghost norm). With
    L = sum_t |a_t| |g_t| (>= the exact norm) and gamma(n) = n u / (1 - n u), the bound
    adds first-order error bounds: 2 gamma(K + O + T^2) L^2 to the ghost norm's square
    (its Gram entries and their sum, doubled for margin), and 2 gamma(T + 1) L to the
    norm (gamma(T) L for the sum over tokens of the materialised product, gamma(T + 1) L
    for the clipped sum's pass, which also rounds s * g; the ghost path has the first as
    slack). Not covered: the pass contracts over examples and tokens together, in XLA's
    order, so other examples' partial sums round differently with this one in or out:
    the float error of any sum, as in `clipped_grad_sum`. Sums of
    squares, whose terms cannot cancel, keep their relative rounding (~1e-7), as in
    `clip_to_norm`. With one token nothing cancels: the bound is the norm.
    """
    _, tokens, k = inputs.shape
    out = grads.shape[-1]
    if ghost is None:
        ghost = _ghost_is_cheaper(tokens, k, out)
    sq = jnp.maximum(kernel_sq_norms(inputs, grads, ghost), 0.0)  # NaN stays NaN
    if tokens == 1:
        return jnp.sqrt(sq)
    magnitude = jnp.sum(_row_norms(inputs) * _row_norms(grads), axis=1)  # L
    if ghost:
        sq = sq + 2 * _gamma(k + out + tokens * tokens) * jnp.square(magnitude)
    return jnp.sqrt(sq) + 2 * _gamma(tokens + 1) * magnitude


def _row_norms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def _gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of n float32 roundings.

    Raises:
      ValueError: n u >= 1/2, where the bound (>= 1) says nothing.
    """
    if n * _UNIT_ROUNDOFF >= 0.5:
        raise ValueError(f"{n} float32 roundings have no useful error bound")
    return n * _UNIT_ROUNDOFF / (1 - n * _UNIT_ROUNDOFF)


def _kernel_grad_sum(layer: _Layer, scaled: jax.Array) -> jax.Array:
    """sum_b scale_b grad_b of the kernel: a batched weight gradient at scaled outputs."""
    if isinstance(layer.module, nn.Dense):
        return jnp.einsum("btk,bto->ko", _layer_factors(layer), scaled, precision=_EXACT)
    # XLA's own weight-gradient convolution beats a matmul of the im2col patches on CPU.
    spec = _ConvSpec.of(layer)
    x = layer.inputs.astype(jnp.float32)
    kernel_shape = (*spec.kernel_size, x.shape[-1], scaled.shape[-1])

    def conv(kernel):
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            spec.strides,
            spec.padding,
            rhs_dilation=spec.dilation,
            dimension_numbers=spec.dimension_numbers(),
            precision=_EXACT,
        )

    out_shape = jax.eval_shape(conv, jax.ShapeDtypeStruct(kernel_shape, jnp.float32)).shape
    (kernel,) = jax.linear_transpose(conv, jax.ShapeDtypeStruct(kernel_shape, jnp.float32))(
        scaled.reshape(out_shape)
    )
    return kernel


def _check_layers(layers: list[_Layer], batch_size: int) -> None:
    seen = set()
    for layer in layers:
        name = "/".join(layer.path)
        if layer.path in seen:
            raise NotImplementedError(f"layer {name} is called more than once")
        seen.add(layer.path)
        if layer.inputs.shape[0] != batch_size:
            raise ValueError(
                f"layer {name}: input leading axis {layer.inputs.shape[0]} is not the "
                f"batch axis ({batch_size})"
            )
        module = layer.module
        if isinstance(module, nn.Conv):
            if module.feature_group_count != 1 or module.mask is not None:
                raise NotImplementedError(f"conv {name}: feature groups and masks unsupported")
            if any(d != 1 for d in _tuple(module.input_dilation, 1)):
                raise NotImplementedError(f"conv {name}: input dilation unsupported")
            if layer.inputs.ndim != len(_tuple(module.kernel_size, None)) + 2:
                raise ValueError(f"conv {name}: input must be [batch, *spatial, features]")


def _assemble(sums: dict[tuple[str, ...], jax.Array], params: PyTree) -> PyTree:
    """Puts the per-layer sums into the structure of `params` (collection "params")."""

    def leaf(path, p):
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        if keys[0] != "params" or keys[1:] not in sums:
            raise ValueError(
                f"parameter {'/'.join(map(str, keys))} is not in a supported layer "
                "(nn.Dense, nn.Conv) used by the loss"
            )
        return sums[keys[1:]].astype(jnp.float32).reshape(p.shape)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _tuple(x, rank: int | None) -> tuple[int, ...]:
    if x is None:
        x = 1
    if isinstance(x, int):
        return (x,) * (rank or 1)
    return tuple(x)


def _lax_padding(padding, rank: int):
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise NotImplementedError(f"conv padding {padding!r} is not supported")
        return padding.upper()
    return nn.linear.canonicalize_padding(padding, rank)
