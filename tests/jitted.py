"""Models run as one compiled program each, for tests that call them on small inputs: op by
op, each operation is a compilation of its own (~100 for a small GAN's D or G)."""

import jax

from dpfed.models import gan

# `model.apply(variables, *args)`, the module `model` static.
apply = jax.jit(lambda model, variables, *args: model.apply(variables, *args), static_argnums=0)

# `gan.generate(generator, variables, noise, train=...)`.
generate = jax.jit(gan.generate, static_argnums=0, static_argnames="train")
