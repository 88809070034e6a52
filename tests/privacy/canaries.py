"""Canary directions (`dpfed.privacy.audit.Canaries`) as dense rows, for tests."""

import numpy as np

from dpfed.privacy import audit


def dense(canaries: audit.Canaries, dim: int) -> np.ndarray:
    """[k, dim]: the directions as dense rows."""
    rows = np.zeros((canaries.num_directions, dim), np.float64)
    np.put_along_axis(rows, np.asarray(canaries.coords), np.asarray(canaries.values), axis=1)
    return rows
