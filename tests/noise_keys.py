"""Records the key of every DP noise draw a run makes, at run time (`recording`).

Every Gaussian noise of a DP release is drawn by `dpfed.privacy.noise.standard_normal`
(`add_gaussian_noise` looks it up at trace time; `group_sizes` calls it through
`dpfed.privacy`). Two draws from one key are the same noise: subtracting the two
releases cancels it. `recording` swaps in a `standard_normal` that first hands the raw
key data (`jax.random.key_data`) to a `jax.debug.callback`, so each draw that runs is
recorded, inside `jit`, `lax.scan`/`while_loop` (once per iteration), `vmap` (once per
element: the callback's batching rule unrolls the batch) and `shard_map` (once per
device's element); a `lax.cond` branch not taken records nothing.

Jitted functions traced before the swap would keep the old `standard_normal`: entering
and leaving `recording` clears JAX's caches (`jax.clear_caches`) and the trainers' own
caches of built models (`datalens.training._build`), so what runs is traced afresh.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

import jax
import numpy as np
import pytest

import dpfed.privacy
from dpfed.generative.datalens import training as datalens_training
from dpfed.privacy import noise as noise_lib


@dataclasses.dataclass(frozen=True)
class NoiseDraw:
    """One draw: the raw data of its key (two uint32 for threefry) and its shape."""

    key: tuple[int, ...]
    shape: tuple[int, ...]


@dataclasses.dataclass
class NoiseKeys:
    """The draws recorded so far, in the order their callbacks ran."""

    draws: list[NoiseDraw] = dataclasses.field(default_factory=list)

    def keys(self) -> list[tuple[int, ...]]:
        return [draw.key for draw in self.draws]

    def reused(self) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
        """Each key drawn from more than once: the shapes of its draws."""
        shapes = collections.defaultdict(list)
        for draw in self.draws:
            shapes[draw.key].append(draw.shape)
        return {key: s for key, s in shapes.items() if len(s) > 1}

    def assert_distinct(self, expected_draws: int) -> None:
        """Exactly `expected_draws` draws (> 0: a run that recorded none fails), no key twice."""
        assert expected_draws > 0, "a check of no draws checks nothing"
        assert len(self.draws) == expected_draws, (len(self.draws), expected_draws)
        reused = self.reused()
        assert not reused, f"{len(reused)} keys drew noise more than once: {reused}"

    def assert_apart_from(self, keys: list[tuple[int, ...]], what: str, splits: int = 8) -> None:
        """No noise key is one of `keys` (another draw's, `recording_keys`), a key split
        from one or one they were split from: in this JAX `split(k, n)[i]` is
        `fold_in(k, i)`, so those are the first `splits` folds either way."""
        assert keys, f"no {what} draw was recorded: a check of no keys checks nothing"
        noise, others = set(self.keys()), set(keys)
        near = (_family(others, splits) & noise) | (_family(noise, splits) & others)
        assert not near, (f"{len(near)} keys are shared by noise and {what} draws, or split "
                          f"from one into the other: {sorted(near)[:4]}")


def _family(keys: set[tuple[int, ...]], splits: int) -> set[tuple[int, ...]]:
    """`keys` and their first `splits` folds (`split(key, n)[i]`, i < splits), raw data."""
    parents = jax.random.wrap_key_data(np.asarray(sorted(keys), np.uint32))
    folds = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.key_data(
        jax.random.fold_in(k, i)))(np.arange(splits)))(parents)
    return keys | set(_key_rows(folds))


@contextlib.contextmanager
def recording_keys(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, key_arg: int = 0
) -> Iterator[list[tuple[int, ...]]]:
    """Records the key (positional argument `key_arg`) of every call of `owner.name` run
    inside the block, per element under vmap as `recording` does: the draws a noise must
    not share a key with (`NoiseKeys.assert_apart_from`). Enter it inside `recording`,
    which clears the caches, so that what runs is traced with it."""
    keys: list[tuple[int, ...]] = []
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        jax.debug.callback(lambda data: keys.extend(_key_rows(data)),
                           jax.random.key_data(args[key_arg]))
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(owner, name, wrapped)
        try:
            yield keys
        finally:
            jax.effects_barrier()


def _key_rows(data: np.ndarray) -> list[tuple[int, ...]]:
    """Raw key data as one tuple per key (per element, should a batch arrive)."""
    data = np.asarray(data)
    return [tuple(int(x) for x in row) for row in data.reshape(-1, data.shape[-1])]


def _record(keys: NoiseKeys, shape: tuple[int, ...]):
    def record(data: np.ndarray) -> None:
        keys.draws.extend(NoiseDraw(key, shape) for key in _key_rows(data))
    return record


def _clear_caches() -> None:
    jax.clear_caches()
    datalens_training._build.cache_clear()


@contextlib.contextmanager
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[NoiseKeys]:
    """Records every `standard_normal` draw run inside the block (`NoiseKeys`).

    Reads the records only after the block: leaving it waits for every callback
    (`jax.effects_barrier`).
    """
    keys = NoiseKeys()
    original = noise_lib.standard_normal

    def standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        jax.debug.callback(_record(keys, tuple(shape)), jax.random.key_data(key))
        return original(key, shape)

    _clear_caches()
    with monkeypatch.context() as patch:
        patch.setattr(noise_lib, "standard_normal", standard_normal)
        patch.setattr(dpfed.privacy, "standard_normal", standard_normal)
        try:
            yield keys
        finally:
            jax.effects_barrier()
            _clear_caches()
