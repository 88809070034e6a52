"""DataLens networks: the student generator's output range and its batch statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.models.datalens_nets import StudentGenerator


def _generate(n, output="sigmoid", output_bias=0.0, seed=0):
    module = StudentGenerator(
        num_classes=10, image_shape=(8, 8, 1), hidden=16, width=4,
        output_bias=output_bias, output=output,
    )
    z = jax.random.uniform(jax.random.key(seed), (n, 5), minval=-1.0, maxval=1.0)
    labels = jnp.arange(n) % 10
    return _init_and_apply(module, z, labels)


@functools.partial(jax.jit, static_argnums=0)
def _init_and_apply(module, z, labels):
    # One compiled program per module and batch size (op by op, the module's layers were
    # ~200 small compilations: most of this file's time).
    params = module.init(jax.random.key(1), z, labels)
    return module.apply(params, z, labels)


@pytest.mark.parametrize("output", ["sigmoid", "hard_sigmoid"])
def test_outputs_are_images_in_the_unit_range(output):
    images = _generate(6, output)
    assert images.shape == (6, 8, 8, 1)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0, output


def test_hard_sigmoid_draws_exact_black_where_sigmoid_cannot():
    hard = _generate(4, "hard_sigmoid", output_bias=-10.0)
    soft = _generate(4, "sigmoid", output_bias=-10.0)
    assert float(jnp.max(hard)) == 0.0, "hard_sigmoid: logits far below -3 give exact zeros"
    assert float(jnp.min(soft)) > 0.0, "a sigmoid never reaches 0"


def test_one_sample_batch_loses_the_latent():
    """Why DataLensConfig requires batch_size >= 2: batch statistics of one sample
    normalise every latent to the same activations."""
    one_a, one_b = _generate(1, seed=0), _generate(1, seed=1)
    np.testing.assert_allclose(np.asarray(one_a), np.asarray(one_b), atol=1e-6)
    two_a, two_b = _generate(2, seed=0), _generate(2, seed=1)
    assert float(jnp.max(jnp.abs(two_a - two_b))) > 1e-4, "with 2 samples z matters"
