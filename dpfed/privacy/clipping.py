"""Per-example L2 clipping of pytrees and the clipped *sum* used by DP-SGD.

The only quantity a DP mechanism may noise is a sum of contributions whose L2 norm
is bounded by the clip norm C: its sensitivity is C under add/remove-one (2C under
replace-one). Means are taken after the noise, by the caller, with the *expected* count.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def global_l2_norm(tree: PyTree) -> jax.Array:
    """L2 norm of all leaves of `tree` taken together (as one flat vector)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_to_norm(tree: PyTree, l2_clip: jax.Array | float) -> tuple[PyTree, jax.Array]:
    """Scales `tree` so that its global L2 norm is at most `l2_clip` (a traced scalar under
    adaptive clipping).

    Returns the clipped tree and the norm before clipping. A zero tree stays zero.
    """
    norm = global_l2_norm(tree)
    scale = jnp.minimum(1.0, l2_clip / jnp.maximum(norm, 1e-12))
    return jax.tree_util.tree_map(lambda x: (x * scale).astype(x.dtype), tree), norm


def clip_scales(norms: jax.Array, mask: jax.Array, l2_clip: float) -> jax.Array:
    """Per-example factors min(1, C / norm), 0 where masked or where the norm is not finite.

    A non-finite gradient (NaN or inf anywhere, or a norm that overflows) contributes
    nothing, like a padded example: 0 * NaN is NaN, so one such example, even masked,
    would otherwise turn the whole sum NaN and make the release depend on whether it
    was sampled. Dropping it is a per-example function whose output has norm 0 <= C.
    """
    keep = jnp.isfinite(norms) & (mask > 0)
    return jnp.where(keep, jnp.minimum(1.0, l2_clip / jnp.maximum(norms, 1e-12)), 0.0)


def where_kept(scales: jax.Array, x: jax.Array) -> jax.Array:
    """`x` [B, ...] with the rows of dropped examples (scale 0) set to 0 (NaN-safe)."""
    return jnp.where((scales > 0).reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


class ClippedSum(NamedTuple):
    """Sum of per-example clipped gradients and the per-example norms before clipping."""

    grad_sum: PyTree
    norms: jax.Array  # [batch]; 0 for padded examples.


def clipped_grad_sum(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    l2_clip: float,
    microbatch_size: int | None = None,
) -> ClippedSum:
    """Sum over the masked batch of per-example gradients, each clipped to `l2_clip`.

    Args:
      loss_fn: `loss_fn(params, example) -> scalar` for ONE example (leaves without a
        batch axis).
      params: model parameters.
      batch: pytree of arrays with a leading batch axis B.
      mask: [B] bool or {0,1}; padded examples (mask 0) contribute exactly nothing, and
        so do examples whose gradient is not finite (`clip_scales`).
      l2_clip: the clip norm C (> 0).
      microbatch_size: per-example gradients are materialised this many at a time
        (bounds memory); None means all B at once. Results do not depend on it.

    Returns:
      ClippedSum with the summed clipped gradient (same structure as params, float32
      whatever their dtype: cast only after the noise, since a bfloat16 sum rounds its
      sensitivity above C) and the [B] per-example gradient norms before clipping (0
      where masked).
    """
    if not 0 < l2_clip < math.inf:
        raise ValueError(f"l2_clip must be > 0 and finite, got {l2_clip}")
    batch_size = mask.shape[0]
    mask = mask.astype(jnp.float32)

    def chunk_sum(chunk, chunk_mask):
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, chunk)
        norms = jax.vmap(global_l2_norm)(grads)
        scale = clip_scales(norms, chunk_mask, l2_clip)
        summed = jax.tree_util.tree_map(
            lambda g: jnp.tensordot(
                scale,
                where_kept(scale, g.astype(jnp.float32)),
                axes=1,
                # Full float32 on every backend: XLA:GPU's default precision would
                # round scale and gradient to TF32 after the norm was taken (up to
                # 2^-11 over C).
                precision=jax.lax.Precision.HIGHEST,
            ),
            grads,
        )
        return summed, jnp.where(chunk_mask > 0, norms, 0.0)

    if microbatch_size is None or microbatch_size >= batch_size:
        grad_sum, norms = chunk_sum(batch, mask)
        return ClippedSum(grad_sum, norms)

    num_chunks = -(-batch_size // microbatch_size)
    padded = num_chunks * microbatch_size

    def to_chunks(x):
        x = jnp.pad(x, [(0, padded - batch_size)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_chunks, microbatch_size) + x.shape[1:])

    chunks = jax.tree_util.tree_map(to_chunks, batch)
    chunk_masks = to_chunks(mask)
    zero = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(acc, inputs):
        summed, norms = chunk_sum(*inputs)
        return jax.tree_util.tree_map(jnp.add, acc, summed), norms

    grad_sum, norms = jax.lax.scan(body, zero, (chunks, chunk_masks))
    return ClippedSum(grad_sum, norms.reshape(-1)[:batch_size])
