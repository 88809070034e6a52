"""Tests for dpfed.models.classifiers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.models import CLASSIFIERS, CNN, get_classifier

_SHAPES = [(28, 28, 1), (8, 8, 1), (32, 32, 3)]


_IMAGES = jax.random.normal(jax.random.key(1), (3, 8, 8, 1), jnp.float32)


@functools.cache
def _initialized(name, **kwargs):
    """(variables, jitted apply) of a classifier on 8x8x1 images, built once per test module."""
    model = get_classifier(name, num_classes=10, **kwargs)
    return jax.jit(model.init)(jax.random.key(0), _IMAGES), jax.jit(model.apply)


def _abstract_params(model, image_shape):
    """Parameter shapes without running (or compiling) anything."""
    x = jax.ShapeDtypeStruct((3, *image_shape), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x), x


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("image_shape", _SHAPES)
def test_logits_shape(name, image_shape):
    model = get_classifier(name, num_classes=7)
    params, x = _abstract_params(model, image_shape)
    logits = jax.eval_shape(model.apply, params, x)
    assert logits.shape == (3, 7), f"{name} on {image_shape} gave logits {logits.shape}"
    assert logits.dtype == jnp.float32, f"{name} gave logits of dtype {logits.dtype}"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_apply_is_deterministic(name):
    params, apply = _initialized(name)
    first, second = np.asarray(apply(params, _IMAGES)), np.asarray(apply(params, _IMAGES))
    np.testing.assert_array_equal(first, second, err_msg=f"{name}.apply is not deterministic")


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_no_state_besides_params(name):
    variables, _ = _abstract_params(get_classifier(name, num_classes=10), (8, 8, 1))
    assert set(variables) == {"params"}, (
        f"{name} has collections {set(variables)}: BatchNorm-like state breaks per-example DP"
    )


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_examples_are_independent(name):
    params, apply = _initialized(name)
    batched = np.asarray(apply(params, _IMAGES))
    alone = np.asarray(apply(params, _IMAGES[:1]))
    np.testing.assert_allclose(
        batched[:1],
        alone,
        rtol=1e-5,
        atol=1e-5,
        err_msg=f"{name}: an example's logits depend on the rest of the batch",
    )


def test_cnn_layers_match_benchmark():
    params, _ = _abstract_params(CNN(num_classes=10), (28, 28, 1))
    shapes = jax.tree.map(lambda a: a.shape, params["params"])
    expected = {
        "Conv_0": {"kernel": (3, 3, 1, 32), "bias": (32,)},
        "Conv_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "Dense_0": {"kernel": (7 * 7 * 64, 10), "bias": (10,)},
    }
    assert shapes == expected, f"CNN layers differ from the benchmark CNN: {shapes}"


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_tanh_activation_from_string(name):
    model = get_classifier(name, num_classes=10, activation="tanh")
    assert model.activation is jnp.tanh, f"activation='tanh' gave {model.activation}"


def test_relu_is_the_default_activation():
    assert CNN(num_classes=10).activation is nn.relu, "the benchmark CNN should use relu"


def test_mlp_hidden_width():
    params, _ = _abstract_params(get_classifier("mlp", num_classes=10, hidden=16), (8, 8, 1))
    kernel_shape = params["params"]["Dense_0"]["kernel"].shape
    assert kernel_shape == (64, 16), f"hidden=16 gave first kernel {kernel_shape}"


def test_unknown_classifier_lists_names():
    with pytest.raises(ValueError) as excinfo:
        get_classifier("resnet", num_classes=10)
    message = str(excinfo.value)
    assert "resnet" in message and all(n in message for n in CLASSIFIERS), (
        f"error should name the bad value and list {CLASSIFIERS}: {message!r}"
    )


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="swish"):
        get_classifier("cnn", num_classes=10, activation="swish")


def test_cnn_with_patch_convs_is_the_same_function():
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
    params = CNN(10).init(jax.random.key(1), x)
    patched = get_classifier("cnn", 10, conv="patches")
    np.testing.assert_allclose(patched.apply(params, x), CNN(10).apply(params, x),
                               rtol=1e-4, atol=1e-4,
                               err_msg="CNN(conv='patches') differs from nn.Conv's CNN "
                                       "on the same parameters")


def test_mlp_has_two_hidden_layers():
    params, _ = _abstract_params(get_classifier("mlp", num_classes=10, hidden=16), (8, 8, 1))
    shapes = {name: layer["kernel"].shape for name, layer in params["params"].items()}
    expected = {"Dense_0": (64, 16), "Dense_1": (16, 16), "Dense_2": (16, 10)}
    assert shapes == expected, (
        f"the MLP must be dense(hidden)-dense(hidden)-dense(classes): {shapes}")
