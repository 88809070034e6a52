"""dpfed/models/output.py: a module's output without `mutable`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dpfed.models.output import output


class _Scaled(nn.Module):
    @nn.compact
    def __call__(self, x, scale=1.0):
        return nn.Dense(3)(x) * scale


def test_output_is_the_modules_apply():
    module = _Scaled()
    x = jnp.ones((2, 4))
    variables = module.init(jax.random.key(0), x)
    np.testing.assert_array_equal(
        output(module, variables, x, scale=2.0), module.apply(variables, x, scale=2.0),
        err_msg="output() must pass its arguments to apply and return its result unchanged")


def test_output_refuses_mutable():
    module = _Scaled()
    variables = module.init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="mutable"):
        output(module, variables, jnp.ones((1, 4)), mutable=["batch_stats"])
