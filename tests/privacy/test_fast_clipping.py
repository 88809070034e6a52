"""Tests of the clipped gradient sum from one batched backward pass (fast_clipping)."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpfed import models
from dpfed.privacy import clipped_grad_sum
from dpfed.privacy.fast_clipping import (
    _gamma,
    _ghost_is_cheaper,
    _sq_norm_bound,
    check_examples_independent,
    clipped_grad_sum_fast,
    kernel_norm_bound,
    kernel_sq_norms,
)


class _ConvZoo(nn.Module):
    """Conv options the fast path must handle: stride, VALID, dilation, explicit and
    asymmetric padding, a non-square kernel, no bias, a Dense over tokens, a 1-D conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(4, (3, 2), strides=2, padding="VALID")(x))
        x = nn.tanh(nn.Conv(5, (2, 3), kernel_dilation=(2, 1), padding=((1, 2), (0, 1)))(x))
        x = nn.tanh(nn.Conv(3, (3, 3), use_bias=False)(x))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, tokens, 3]
        x = nn.tanh(nn.Dense(6)(x))  # per-token Dense: kernel grad sums over tokens
        x = nn.tanh(nn.Conv(2, (3,), strides=(2,), padding="SAME")(x))  # 1-D conv
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _losses(model):
    def batch_losses(params, batch):
        logits = model.apply(params, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])

    def example_loss(params, example):
        return batch_losses(params, (example[0][None], example[1][None]))[0]

    return batch_losses, example_loss


def _jit(clipped_sum, loss, clip):
    return jax.jit(lambda params, batch, mask: clipped_sum(loss, params, batch, mask, clip))


def _compare(model, image_shape, num_classes, batch=7, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(batch, *image_shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
    mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0][:batch], jnp.float32)
    params = model.init(jax.random.key(seed), images[:1])
    batch_losses, example_loss = _losses(model)
    norms = _jit(clipped_grad_sum, example_loss, 1e9)(params, (images, labels), mask).norms
    clip = float(np.median(np.asarray(norms)[np.asarray(mask) > 0]))  # clips about half
    fast = _jit(clipped_grad_sum_fast, batch_losses, clip)(params, (images, labels), mask)
    # The fast norms are upper bounds that allow for rounding: never below the vmap
    # norms, above them by the bound's margin (~1e-3 at most on these random images).
    np.testing.assert_array_less(
        np.asarray(norms) * (1 - 1e-5), np.asarray(fast.norms) + (np.asarray(mask) == 0),
        err_msg="a fast norm is below the per-example gradient's norm",
    )
    np.testing.assert_allclose(
        fast.norms, norms, rtol=2e-3, err_msg="per-example norms differ beyond the margin"
    )
    # The clipped sum is sum_b min(1, C / norm_b) grad_b at the fast norms.
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, (images, labels))
    bounds = np.maximum(np.asarray(fast.norms), 1e-12)
    scale = np.where(np.asarray(mask) > 0, np.minimum(1.0, clip / bounds), 0.0)
    for (path, g), got in zip(
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree_util.tree_leaves(fast.grad_sum),
        strict=True,
    ):
        want = np.tensordot(scale, np.asarray(g, np.float64), axes=1)
        assert got.shape == want.shape and got.dtype == jnp.float32, jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            got, want, rtol=1e-4, atol=1e-5, err_msg=f"clipped sum differs at {path}"
        )


def test_matches_vmap_clipped_sum_on_the_benchmark_cnn():
    _compare(models.get_classifier("cnn", 10), (12, 12, 1), 10)


def test_matches_vmap_clipped_sum_on_strided_dilated_padded_convs_and_token_dense():
    _compare(_ConvZoo(), (11, 10, 2), 4)


def test_padded_examples_contribute_nothing():
    model = models.get_classifier("cnn", 3)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(5, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 0, 1], jnp.int32)
    params = model.init(jax.random.key(0), images[:1])
    batch_losses, _ = _losses(model)
    mask = jnp.asarray([1, 1, 1, 0, 0])
    garbage = images.at[3:].set(1e4)
    fast = _jit(clipped_grad_sum_fast, batch_losses, 0.5)
    padded = fast(params, (garbage, labels), mask)
    alone = fast(params, (images[:3], labels[:3]), mask[:3])
    np.testing.assert_array_equal(padded.norms[3:], 0.0, err_msg="masked norms must be 0")
    for got, want in zip(
        jax.tree_util.tree_leaves(padded.grad_sum),
        jax.tree_util.tree_leaves(alone.grad_sum),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg="padding leaked")


@pytest.mark.parametrize("masked", [False, True])
def test_a_non_finite_example_contributes_nothing(masked):
    model = models.get_classifier("cnn", 3)
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 0], jnp.int32)
    params = model.init(jax.random.key(0), images[:1])
    batch_losses, _ = _losses(model)
    broken = images.at[1, 3, 3, 0].set(np.nan)
    mask = jnp.asarray([1, 0 if masked else 1, 1, 1])
    fast = _jit(clipped_grad_sum_fast, batch_losses, 0.5)
    got = fast(params, (broken, labels), mask)
    keep = np.array([0, 2, 3])
    want = fast(params, (images[keep], labels[keep]), jnp.ones(3))
    for g, w in zip(jax.tree_util.tree_leaves(got.grad_sum),
                    jax.tree_util.tree_leaves(want.grad_sum), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6,
                                   err_msg=f"a NaN example (masked={masked}) leaked in")


def test_every_clipped_contribution_has_norm_at_most_clip():
    model = models.get_classifier("cnn", 3)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8, 1)) * 5, jnp.float32)
    params = model.init(jax.random.key(0), images)
    batch_losses, _ = _losses(model)
    result = _jit(clipped_grad_sum_fast, batch_losses, 0.1)(
        params, (images, jnp.asarray([1])), jnp.ones(1)
    )
    total = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(result.grad_sum)))
    assert float(result.norms[0]) > 0.1, "the test example must need clipping"
    assert 0.1 * (1 - 1e-3) <= float(total) <= 0.1, (
        f"one example's clipped sum must have norm C (less the bound's margin): {total}"
    )


class _TokenMean(nn.Module):
    """A Dense over 16 tokens of 64 features, averaged: the tokens' terms can cancel."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.Dense(64)(x).mean(axis=1))


def _cancelling_tokens(scale, batch, seed=3, tokens=16, features=64):
    """Tokens scale * (+-u) + 2 e_t: the large parts cancel in the layer's gradient."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=features)
    signs = np.tile([1.0, -1.0], tokens // 2)[None, :, None]
    x = scale * signs * u / np.linalg.norm(u) + 2 * rng.normal(size=(batch, tokens, features))
    return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, 10, batch), jnp.int32)


@pytest.mark.parametrize("scale", [1e5, 1e9])
def test_one_example_moves_the_sum_by_at_most_clip_when_its_tokens_cancel(scale):
    # The per-example norms' float32 rounding is ~1e-7 of the tokens' terms, which here
    # are 1e5-1e9 times larger than the norm: an unguarded norm comes out far too small
    # (even 0), and the example goes in barely clipped (6.4 C at 1e5 before the bound).
    model = _TokenMean()
    images, labels = _cancelling_tokens(scale, 32)
    params = model.init(jax.random.key(0), images[:1])
    batch_losses, example_loss = _losses(model)
    norms = _jit(clipped_grad_sum, example_loss, 1e30)(params, (images, labels), jnp.ones(32))
    clip = 0.1 * float(np.median(np.asarray(norms.norms)))
    fast = _jit(clipped_grad_sum_fast, batch_losses, clip)
    full = fast(params, (images, labels), jnp.ones(32)).grad_sum
    worst = 0.0
    for b in range(32):
        without = fast(params, (images, labels), jnp.ones(32).at[b].set(0)).grad_sum
        worst = max(worst, _distance(full, without) / clip)
    assert worst <= 1 + 1e-5, f"one example moved the clipped sum by {worst:.4g} C"


@pytest.mark.parametrize("scale", [1e5, 1e9])
def test_one_cancelling_example_among_ordinary_ones_moves_the_sum_by_at_most_clip(scale):
    # The test above has every example cancel; here one adversary's huge tokens sit in a
    # batch of ordinary examples, whose sums it must not skew (a privacy review, stop 66).
    # Without `kernel_norm_bound`'s error terms the adversary at 1e9 moved it by 1.14 C.
    model = _TokenMean()
    images, labels = _cancelling_tokens(0.0, 32)  # scale 0: ordinary tokens
    images = images.at[0].set(_cancelling_tokens(scale, 1, seed=4)[0][0])
    params = model.init(jax.random.key(0), images[:1])
    batch_losses, example_loss = _losses(model)
    norms = _jit(clipped_grad_sum, example_loss, 1e30)(params, (images, labels), jnp.ones(32))
    clip = float(np.median(np.asarray(norms.norms)[1:]))  # clips about half the others
    fast = _jit(clipped_grad_sum_fast, batch_losses, clip)
    full = fast(params, (images, labels), jnp.ones(32)).grad_sum
    without = fast(params, (images, labels), jnp.ones(32).at[0].set(0)).grad_sum
    moved = _distance(full, without) / clip
    assert moved <= 1 + 1e-5, f"the adversary moved the clipped sum by {moved:.4g} C"


def _distance(a, b) -> float:
    """The L2 distance of two pytrees, in float64."""
    return float(np.sqrt(sum(
        np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )))


@pytest.mark.parametrize("ghost", [True, False])
def test_kernel_norm_bound_is_above_the_exact_norm_when_tokens_cancel(ghost):
    rng = np.random.default_rng(0)
    for scale in (1.0, 1e3, 1e5, 1e8):
        a = np.asarray(_cancelling_tokens(scale, 64)[0])
        g = np.asarray(rng.normal(size=(64, 16, 8)), np.float32)
        g[:, 1::2] = g[:, ::2]  # equal output grads at +u and -u: the u parts cancel
        exact = np.sqrt(np.sum(
            np.einsum("btk,bto->bko", a.astype(np.float64), g.astype(np.float64)) ** 2,
            axis=(1, 2),
        ))
        bound = np.asarray(kernel_norm_bound(jnp.asarray(a), jnp.asarray(g), ghost=ghost))
        finite = np.isfinite(bound)
        assert finite.mean() > 0.5, f"scale {scale}: the bound is not finite for most examples"
        assert np.all(bound[finite] >= exact[finite]), (
            f"scale {scale}, ghost={ghost}: bound/exact as low as "
            f"{np.min(bound[finite] / exact[finite]):.4g}"
        )


def test_the_bound_is_the_norm_where_nothing_cancels():
    rng = np.random.default_rng(1)
    a = jnp.asarray(np.abs(rng.normal(size=(8, 5, 30))), jnp.float32)
    g = jnp.asarray(np.abs(rng.normal(size=(8, 5, 20))), jnp.float32)
    exact = np.sqrt(np.asarray(kernel_sq_norms(a, g)))
    np.testing.assert_allclose(kernel_norm_bound(a, g), exact, rtol=1e-5,
                               err_msg="aligned positive terms need no more than ~T u margin")
    one = kernel_norm_bound(a[:, :1], g[:, :1])
    np.testing.assert_array_equal(one, np.sqrt(np.asarray(kernel_sq_norms(a[:, :1], g[:, :1]))),
                                  err_msg="one token: nothing cancels, the bound is the norm")


def test_the_bias_bound_is_above_the_exact_norm_when_tokens_cancel():
    # The bias gradient sum_t g_t cancels like the kernel's: large opposite grads.
    rng = np.random.default_rng(2)
    big = 1e6 * rng.normal(size=(64, 1, 8))
    g = np.concatenate([big, -big], axis=1) + rng.normal(size=(64, 2, 8))
    g = g.astype(np.float32)
    a = np.zeros((64, 2, 3), np.float32)  # no kernel gradient: the bias alone
    exact = np.sqrt(np.sum(np.sum(g.astype(np.float64), axis=1) ** 2, axis=-1))
    bound = np.sqrt(np.asarray(_sq_norm_bound(jnp.asarray(a), jnp.asarray(g), bias=True)))
    assert np.all(bound >= exact), f"bias bound/exact as low as {np.min(bound / exact):.4g}"


def test_the_ghost_norm_is_not_chosen_where_its_error_bound_says_nothing():
    # T = 4096 tokens: T^2 u > 1/2, the ghost norm's bound would be negative or divide
    # by 0 (every example dropped as NaN), though the ghost norm is 4x cheaper here.
    assert 4096 * 4096 * (2 * 16384) < 4096 * 16384 * 16384, "the ghost norm is cheaper"
    assert not _ghost_is_cheaper(4096, 16384, 16384), "its error bound says nothing"
    assert _ghost_is_cheaper(16, 288, 64), "digits' conv2 keeps the ghost norm"
    with pytest.raises(ValueError, match="no useful error bound"):
        _gamma(2**23)


def _precisions(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_precisions(sub))
    return found


def test_the_clipping_contractions_run_in_full_float32():
    # XLA:GPU's default precision rounds float32 products to TF32 (10 mantissa bits):
    # after the norm, that would scale contributions up to ~2^-11 over C.
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    model = _TokenMean()
    images, labels = _cancelling_tokens(1.0, 4)
    params = model.init(jax.random.key(0), images[:1])
    batch_losses, example_loss = _losses(model)
    fast = jax.make_jaxpr(
        lambda p: clipped_grad_sum_fast(batch_losses, p, (images, labels), jnp.ones(4), 1.0)
    )(params).jaxpr
    # 2 Gram matrices (ghost norm of the token Dense) + 2 batched weight gradients.
    assert sum(p == highest for p in _precisions(fast)) == 4, _precisions(fast)
    vmapped = jax.make_jaxpr(
        lambda p: clipped_grad_sum(example_loss, p, (images, labels), jnp.ones(4), 1.0)
    )(params).jaxpr
    # One scale-weighted sum per parameter leaf (2 kernels, 2 biases).
    assert sum(p == highest for p in _precisions(vmapped)) == 4, _precisions(vmapped)


@pytest.mark.parametrize("tokens,k,out", [(1, 5, 3), (4, 30, 20), (9, 2, 3)])
def test_ghost_norm_equals_materialised_norm(tokens, k, out):
    rng = np.random.default_rng(tokens)
    a = jnp.asarray(rng.normal(size=(3, tokens, k)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, tokens, out)), jnp.float32)
    want = np.sum(np.einsum("btk,bto->bko", np.asarray(a), np.asarray(g)) ** 2, axis=(1, 2))
    for ghost in (True, False, None):
        np.testing.assert_allclose(
            kernel_sq_norms(a, g, ghost=ghost), want, rtol=1e-4, err_msg=f"ghost={ghost}"
        )


class _Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4)
        return dense(nn.tanh(dense(x.reshape(x.shape[0], -1)[:, :4])))


class _RawParam(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (1,))
        return nn.Dense(3)(x.reshape(x.shape[0], -1)) * scale


@pytest.mark.parametrize(
    "model,error,match",
    [
        (_Shared(), NotImplementedError, "called more than once"),
        (_RawParam(), ValueError, "params/scale is not in a supported layer"),
        (
            nn.Sequential([nn.Conv(2, (3, 3), padding="CIRCULAR"), lambda x: x.sum((1, 2))]),
            NotImplementedError,
            "CIRCULAR",
        ),
        # Depthwise/grouped and input-dilated convs: the per-example norm of their kernel
        # gradient is not what the fast path computes (a wrong norm is a wrong clip).
        (
            nn.Sequential([nn.Conv(2, (1, 1)), nn.Conv(2, (3, 3), feature_group_count=2),
                           lambda x: x.sum((1, 2))]),
            NotImplementedError,
            "feature groups",
        ),
        (
            nn.Sequential([nn.Conv(2, (3, 3), input_dilation=2, padding=((1, 1), (1, 1))),
                           lambda x: x.sum((1, 2))]),
            NotImplementedError,
            "input dilation",
        ),
        # A layer whose rows are not the examples (here 4 rows of 8 features from 2
        # examples): its per-row norms are not per-example norms.
        (
            nn.Sequential([lambda x: x.reshape(-1, 8), nn.Dense(3), lambda x: x.reshape(2, -1)]),
            ValueError,
            "input leading axis 4 is not the batch axis",
        ),
        # A 1-D conv on [batch, H, W, C]: flax folds H into the batch, so the per-example
        # norms would be per (example, row).
        (
            nn.Sequential([nn.Conv(2, (3,)), lambda x: x.sum((1, 2))]),
            ValueError,
            "input must be \\[batch, \\*spatial, features\\]",
        ),
    ],
)
def test_unsupported_models_are_refused(model, error, match):
    images = jnp.ones((2, 4, 4, 1))
    params = model.init(jax.random.key(0), images)

    def batch_losses(p, batch):
        return jnp.sum(model.apply(p, batch[0]) ** 2, axis=-1)

    with pytest.raises(error, match=match):
        clipped_grad_sum_fast(batch_losses, params, (images, jnp.zeros(2)), jnp.ones(2), 1.0)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("inf"), float("nan")])
def test_rejects_a_clip_that_is_not_positive_and_finite(clip):
    # An infinite clip clips nothing (and noise z C is then inf); NaN turns the sum NaN.
    with pytest.raises(ValueError, match="l2_clip"):
        clipped_grad_sum_fast(lambda p, b: b, {}, jnp.ones(2), jnp.ones(2), clip)


def _images_and_labels(batch, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(batch, 6, 6, 1)), jnp.float32),
            jnp.asarray(rng.integers(0, 4, batch), jnp.int32))


@pytest.mark.parametrize("name", ["cnn", "mlp", "logreg"])
@pytest.mark.parametrize("batch", [
    # slow: ~4 s for the three; the fast suite keeps batch 11 (the same check of the same
    # three models, with four index bits where batch 2 has one)
    pytest.param(2, marks=pytest.mark.slow), 11])
def test_the_repo_classifiers_pass_the_independence_check(name, batch):
    model = models.get_classifier(name, 4)
    images, labels = _images_and_labels(batch)
    params = model.init(jax.random.key(0), images[:1])
    check_examples_independent(_losses(model)[0], params, (images, labels))  # no error


class _MixOnePair(nn.Module):
    """Example `target` gets example `source`'s hidden units: one mixing pair."""

    @nn.compact
    def __call__(self, x, source):
        h = nn.tanh(nn.Dense(5)(x.reshape(x.shape[0], -1)))
        h = h + jnp.where((source >= 0)[:, None], h[jnp.maximum(source, 0)], 0.0)
        return nn.Dense(3)(h)


def test_the_independence_check_finds_every_mixing_pair():
    # One pass per side of each index bit: every ordered pair differs in some bit, so
    # each of the 5 x 4 pairs must be caught, whichever of the two is the source. Batch 5:
    # three index bits, not a power of two (example 4 alone has the top bit), and 20
    # checks (each compiles its passes) where batch 7 took 42.
    batch = 5
    model = _MixOnePair()
    images, _ = _images_and_labels(batch)
    params = model.init(jax.random.key(0), images[:1], -jnp.ones(1, jnp.int32))

    def losses(p, b):
        return jnp.sum(model.apply(p, b[0], b[1]) ** 2, axis=-1)

    check_examples_independent(losses, params, (images, -jnp.ones(batch, jnp.int32)))
    for source in range(batch):
        for target in range(batch):
            if source == target:
                continue
            pointers = -np.ones(batch, np.int32)
            pointers[target] = source
            with pytest.raises(ValueError, match=f"example {target}'s loss moves"):
                check_examples_independent(losses, params, (images, jnp.asarray(pointers)))


class _NormaliseBatch(nn.Module):
    """Parameter-free batch statistics (BatchNorm on the batch, without scale/bias)."""

    where: str

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        if self.where == "input":
            x = x - x.mean(0)
        h = nn.tanh(nn.Dense(5)(x))
        if self.where == "hidden":
            h = nn.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)(h)
        return nn.Dense(3)(h)


@pytest.mark.parametrize("where", ["input", "hidden", "loss"])
def test_the_independence_check_finds_batch_statistics(where):
    # A batch mean before the first layer, between layers (BatchNorm) or in the loss
    # makes the per-example norms of one batched pass wrong; the fast path cannot see it.
    model = _NormaliseBatch(where)
    images, labels = _images_and_labels(6)
    variables = model.init(jax.random.key(0), images)

    def losses(p, b):
        logits = model.apply(p, b[0], mutable=["batch_stats"])[0]
        each = optax.softmax_cross_entropy_with_integer_labels(logits, b[1])
        return each - each.mean() if where == "loss" else each

    with pytest.raises(ValueError, match="loss moves with the values of other examples"):
        check_examples_independent(losses, variables, (images, labels))


def test_the_independence_check_refuses_non_finite_losses():
    images, labels = _images_and_labels(3)
    model = models.get_classifier("logreg", 4)
    params = model.init(jax.random.key(0), images[:1])

    def losses(p, b):
        return _losses(model)[0](p, b) * jnp.inf

    with pytest.raises(ValueError, match="not finite"):
        check_examples_independent(losses, params, (images, labels))


def test_the_independence_check_finds_mixing_after_integer_inputs():
    # Tokens carry no tangent: the check must perturb the layers' outputs to see a mix.
    model = nn.Sequential([lambda t: jax.nn.one_hot(t, 5).reshape(t.shape[0], -1), nn.Dense(4),
                           lambda h: h - h.mean(0), nn.Dense(3)])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 5, (6, 3)), jnp.int32)
    params = model.init(jax.random.key(0), tokens)

    def losses(p, b):
        return jnp.sum(model.apply(p, b) ** 2, axis=-1)

    with pytest.raises(ValueError, match="loss moves with the values of other examples"):
        check_examples_independent(losses, params, tokens)


class _StopGradientCentred(nn.Module):
    """Batch centring whose statistics carry no derivative: invisible to tangents."""

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(5)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(h - jax.lax.stop_gradient(h.mean(0)))


def test_the_independence_check_finds_mixing_without_a_derivative():
    # Tangents see nothing here, yet example b's gradient moves with the others' values
    # (a review measured one example moving the fast clipped sum by 1.145 C).
    model = _StopGradientCentred()
    images, labels = _images_and_labels(6)
    params = model.init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="loss moves with the values of other examples"):
        check_examples_independent(_losses(model)[0], params, (images, labels))


def test_the_independence_check_finds_a_loss_weighted_by_the_batch_labels():
    # Integer leaves carry no tangent: only the values pass sees a class-balanced loss.
    model = models.get_classifier("logreg", 4)
    images, labels = _images_and_labels(8)
    params = model.init(jax.random.key(0), images[:1])

    def balanced(p, b):
        counts = jnp.sum(jax.nn.one_hot(b[1], 4), axis=0)
        return _losses(model)[0](p, b) / counts[b[1]]

    with pytest.raises(ValueError, match="loss moves with the values of other examples"):
        check_examples_independent(balanced, params, (images, labels))


def test_the_independence_check_names_a_layer_off_the_batch_axis():
    model = nn.Sequential([lambda x: x.reshape(-1, 18), nn.Dense(3)])
    images, labels = _images_and_labels(4)  # 4 x 36 values -> 8 rows of 18
    params = model.init(jax.random.key(0), images)

    def losses(p, b):
        return jnp.sum(model.apply(p, b[0]).reshape(4, -1) ** 2, axis=-1)

    with pytest.raises(ValueError, match="is not the batch axis"):
        check_examples_independent(losses, params, (images, labels))


@pytest.mark.parametrize("ghost", [True, False])
def test_the_bound_adds_both_documented_error_terms_in_full(ghost):
    # Where the tokens cancel, the error terms are nearly all of the bound, and the
    # rounding they cover is rarely met in full, so no norm test notices a term halved:
    # 2 gamma(K + O + T^2) L^2 to the ghost norm's square, 2 gamma(T + 1) L to the norm
    # (gamma(T) L for the materialised sum, gamma(T + 1) L for the clipped sum's pass).
    a = _cancelling_tokens(1e7, 8)[0]
    g = np.asarray(np.random.default_rng(6).normal(size=(8, 16, 8)), np.float32)
    g[:, 1::2] = g[:, ::2]  # equal output grads at +u and -u: the u parts cancel
    g = jnp.asarray(g)
    _, tokens, k = a.shape
    out = g.shape[-1]
    sq = np.maximum(np.asarray(kernel_sq_norms(a, g, ghost), np.float64), 0.0)
    magnitude = np.sum(np.linalg.norm(np.asarray(a, np.float64), axis=-1)
                       * np.linalg.norm(np.asarray(g, np.float64), axis=-1), axis=1)
    if ghost:
        sq = sq + 2 * _gamma(k + out + tokens * tokens) * magnitude**2
    want = np.sqrt(sq) + 2 * _gamma(tokens + 1) * magnitude
    np.testing.assert_allclose(
        np.asarray(kernel_norm_bound(a, g, ghost=ghost)), want, rtol=1e-4,
        err_msg=f"ghost={ghost}: the bound is not sqrt(sq (+ 2 gamma(K + O + T^2) L^2)) + "
                "2 gamma(T + 1) L")
