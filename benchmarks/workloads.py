"""Synthetic client data the federated benchmarks share."""

from __future__ import annotations

import numpy as np

from dpfed.federated import ClientData


def mnist_shaped_clients(population: int, examples: int, seed: int = 0) -> ClientData:
    """`population` clients of `examples` uniform 28x28x1 images each, labels in 0-9."""
    rng = np.random.default_rng(seed)
    return ClientData(
        arrays=(rng.random((population, examples, 28, 28, 1), dtype=np.float32),
                rng.integers(0, 10, (population, examples)).astype(np.int32)),
        counts=np.full(population, examples, np.int32))
