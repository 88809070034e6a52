"""`output`: what a Flax module's `apply` returns without `mutable`, typed as such.

Flax types `Module.apply` as `output | (output, state)` whatever `mutable` says
(google/flax#4779), so a caller that annotates the result (`logits: jax.Array = ...`)
needs a `type: ignore`. Call `output(model, variables, ...)` instead: it returns `Any`,
and refuses `mutable`, the one argument under which `apply` returns a pair.
"""

from typing import Any

from flax import linen as nn


def output(module: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """`module.apply(variables, *args, **kwargs)`: the module's output alone.

    Raises:
      ValueError: `mutable` is given (`apply` would return (output, updated state)).
    """
    if "mutable" in kwargs:
        raise ValueError("output() returns the output alone: call module.apply for `mutable`")
    return module.apply(variables, *args, **kwargs)
