"""A weights file of random arrays in the FID Inception's format (`dpfed.eval.inception`).

The real weights cannot be fetched offline; these have the real file's keys and shapes
(pytorch-fid's state dict, with its `fc.weight` that the loader ignores), so the tests
and `tests.crash_points`' evaluate mode run the whole network on them.
"""

import os

import numpy as np

from dpfed.eval import inception


def random_state(seed: int = 0) -> dict[str, np.ndarray]:
    """The network's arrays, drawn He-like so its activations stay finite."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in inception.expected_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = np.prod(shape[1:])
            state[key] = (rng.normal(size=shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        else:
            state[key] = (rng.normal(size=shape) * 0.1).astype(np.float32)
    return state


def write(path: str | os.PathLike, seed: int = 0) -> None:
    """Writes `random_state(seed)` and a zero `fc.weight` to the .npz file `path`."""
    np.savez(path, **random_state(seed), **{"fc.weight": np.zeros((1008, 2048), np.float32)})
