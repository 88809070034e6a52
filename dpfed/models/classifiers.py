"""Small image classifiers for DP-SGD and downstream-accuracy evaluation.

All modules are Flax linen modules that map images ``[B, H, W, C]`` (float32) to
logits ``[B, num_classes]``. None uses BatchNorm or dropout: per-example DP
gradients need examples to be independent inside a batch and ``apply`` to be a
pure function of ``(params, x)`` (Abadi et al., 2016, "Deep Learning with
Differential Privacy").
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfed.models import layers

Activation = Callable[[jax.Array], jax.Array]


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0], -1))


class CNN(nn.Module):
    """The benchmark CNN: conv32-act-pool-conv64-act-pool-dense(num_classes).

    Convolutions are 3x3 with SAME padding; pools are 2x2 max pools with stride 2
    (`layers.max_pool_2x2`).
    ``activation=jnp.tanh`` gives the tempered variant that trains better under
    DP-SGD (Papernot et al., 2021, "Tempered Sigmoid Activations for Deep Learning
    with Differential Privacy").

    ``conv`` picks the convolution: "xla" (`nn.Conv`), "patches" (`layers.Conv`: the same
    function and parameter tree, several times faster inside the loops of the federated
    engine and under DP-SGD's per-example `vmap` on CPU) or "auto" (`layers.default_conv`).
    ``pool`` is the 2x2 stride-2 max pool (`benchmarks/max_pool.py` passes `nn.max_pool`'s).
    """

    num_classes: int
    activation: Activation = nn.relu
    conv: str = "xla"
    pool: Activation = layers.max_pool_2x2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv if layers.resolve_conv(self.conv) == "xla" else layers.Conv
        for features in (32, 64):
            x = conv(features, kernel_size=(3, 3))(x)
            x = self.activation(x)
            x = self.pool(x)  # max_pool_2x2: nn.max_pool's values, a cheaper gradient
        return nn.Dense(self.num_classes)(_flatten(x))


class MLP(nn.Module):
    """Two hidden layers: flatten-dense(hidden)-act-dense(hidden)-act-dense(num_classes)."""

    num_classes: int
    hidden: int = 256
    activation: Activation = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _flatten(x)
        for _ in range(2):
            x = self.activation(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class LogReg(nn.Module):
    """Multinomial logistic regression: flatten-dense(num_classes)."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(_flatten(x))


_REGISTRY: dict[str, type[nn.Module]] = {"cnn": CNN, "mlp": MLP, "logreg": LogReg}
CLASSIFIERS: tuple[str, ...] = tuple(_REGISTRY)

ACTIVATIONS: dict[str, Activation] = {"relu": nn.relu, "tanh": jnp.tanh}


def get_classifier(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Returns the classifier called ``name`` (one of ``CLASSIFIERS``).

    ``kwargs`` go to the module's constructor (e.g. ``hidden=128`` for the MLP,
    ``activation=jnp.tanh`` for the CNN); an ``activation`` given as a string is
    looked up in ``ACTIVATIONS``, so a flag value can be passed straight through.

    Raises:
      ValueError: if ``name`` or a string ``activation`` is unknown.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown classifier {name!r}; expected one of {', '.join(CLASSIFIERS)}")
    activation = kwargs.get("activation")
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        kwargs["activation"] = ACTIVATIONS[activation]
    return _REGISTRY[name](num_classes=num_classes, **kwargs)
