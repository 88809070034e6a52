"""The generator contract: how every generative method hands samples to the evaluators.

Every generative method (P0 GAN, P1 DPD-fVAE, P2 DataLens, P3 DP-GMM) exposes a
`Generator`: ``sample(params, key, n, labels=None) -> (images, labels)`` with images
float32 ``[n, H, W, C]`` in ``[0, 1]``. A conditional method returns the int32 labels
it generated for (the given ``labels``, or labels it drew itself); an unconditional one
returns ``labels=None``. Evaluators (`dpfed.eval`) only ever see this interface, so
every evaluator works with every method.

How a workdir exposes its generator to ``experiments/evaluate.py``, in order:
1. ``summary.json`` names the method under ``"method"`` (e.g. ``"dpd_fvae"``). The
   module ``dpfed.generative.<method>`` is imported, which calls
   ``register_generator(method, loader)`` at import time; ``loader(workdir)`` restores
   the released parameters from the workdir and returns ``(generator, params)``.
2. Otherwise, the workdir holds ``synthetic.npz`` (``images`` and, when labelled,
   ``labels``), written with `save_synthetic`. Any method, or a user, can always fall
   back to this.
"""

import importlib
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dpfed.train import workdir as workdir_lib

SYNTHETIC_FILE = "synthetic.npz"
METHOD_KEY = "method"


class Generator(Protocol):
    """A trained generative model's sampler (params are passed in, never held)."""

    def sample(
        self, params: Any, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """Returns ``n`` images float32 ``[n, H, W, C]`` in [0, 1] and their labels.

        ``labels`` (int32 ``[n]``) asks a conditional generator for those classes; an
        unconditional generator ignores it and returns ``None`` as labels.
        """


GeneratorLoader = Callable[[workdir_lib.Workdir], tuple[Generator, Any]]

_LOADERS: dict[str, GeneratorLoader] = {}


class SyntheticSet(NamedTuple):
    """Generated images float32 ``[N, H, W, C]`` in [0, 1] and int32 labels (or None)."""

    images: np.ndarray
    labels: np.ndarray | None


def register_generator(method: str, loader: GeneratorLoader) -> None:
    """Registers ``loader(workdir) -> (generator, params)`` for workdirs of ``method``."""
    _LOADERS[method] = loader


def generator_loader(method: str) -> GeneratorLoader:
    """The loader registered for ``method``, importing ``dpfed.generative.<method>``
    first so that it registers itself.

    Raises:
      LookupError: if no loader is registered for ``method`` (e.g. ``fedlm_debug``, whose
        models are language models).
    """
    if method not in _LOADERS:
        try:
            importlib.import_module(f"dpfed.generative.{method}")
        except ModuleNotFoundError as error:
            raise LookupError(f"no generative method module dpfed.generative.{method}") from error
    if method not in _LOADERS:
        raise LookupError(f"dpfed.generative.{method} registers no generator loader")
    return _LOADERS[method]


def load_generator(workdir: workdir_lib.Workdir, method: str) -> tuple[Generator, Any]:
    """Returns ``(generator, params)`` of ``method`` restored from ``workdir``.

    Raises:
      LookupError: if no loader is registered for ``method`` (`generator_loader`).
    """
    return generator_loader(method)(workdir)


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """``n`` int32 labels cycling through the classes: counts differ by at most one."""
    return (np.arange(n) % num_classes).astype(np.int32)


def sample_synthetic(
    generator: Generator,
    params: Any,
    key: jax.Array,
    n: int,
    num_classes: int,
    chunk_size: int = 1000,
) -> SyntheticSet:
    """Draws ``n`` samples in chunks (bounded memory), asking for balanced labels.

    Every chunk asks the generator for exactly ``chunk_size`` samples (the last one's
    surplus is dropped): a generator that normalises with its batch's statistics
    (DataLens's student) then draws every sample in a batch of the same size; a
    leftover chunk of one sample would otherwise ignore its latent. Chunk ``i`` uses
    ``jax.random.fold_in(key, i)``, so the result depends only on ``(key, n, chunk_size)``.
    """
    num_chunks = -(-n // chunk_size)
    labels = balanced_labels(num_chunks * chunk_size, num_classes)
    images_out, labels_out = [], []
    for i in range(num_chunks):
        wanted = jnp.asarray(labels[i * chunk_size : (i + 1) * chunk_size])
        chunk, got = generator.sample(params, jax.random.fold_in(key, i), chunk_size, wanted)
        images_out.append(np.asarray(chunk, np.float32))
        labels_out.append(None if got is None else np.asarray(got, np.int32))
    images = np.concatenate(images_out)[:n]
    labelled = [got for got in labels_out if got is not None]
    if len(labelled) < len(labels_out):
        return SyntheticSet(images, None)
    return SyntheticSet(images, np.concatenate(labelled)[:n])


def check_synthetic(synthetic: SyntheticSet) -> None:
    """Checks the contract's shapes, dtypes and ranges.

    Raises:
      ValueError: naming what is wrong.
    """
    images, labels = synthetic
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be [N>0, H, W, C], got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1:
        raise ValueError("images must be finite and in [0, 1]")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N={images.shape[0]}], got shape {labels.shape}")


def save_synthetic(path: str | os.PathLike, synthetic: SyntheticSet) -> pathlib.Path:
    """Writes a synthetic set as ``.npz`` (``images``, and ``labels`` when labelled)."""
    check_synthetic(synthetic)
    path = pathlib.Path(path)
    arrays = {"images": np.asarray(synthetic.images, np.float32)}
    if synthetic.labels is not None:
        arrays["labels"] = np.asarray(synthetic.labels, np.int32)
    workdir_lib.atomic_write_with(
        path, lambda f: np.savez_compressed(f, allow_pickle=False, **arrays))
    return path


def load_synthetic(path: str | os.PathLike) -> SyntheticSet:
    """Reads a ``.npz`` with ``images`` (and optionally ``labels``) and checks it.

    Raises:
      ValueError: if ``images`` is missing or the arrays break the contract.
    """
    with np.load(path) as data:
        if "images" not in data:
            raise ValueError(f"{path} has no 'images' array (found: {', '.join(data.files)})")
        images = data["images"].astype(np.float32)
        labels = data["labels"].astype(np.int32) if "labels" in data else None
    synthetic = SyntheticSet(images, labels)
    check_synthetic(synthetic)
    return synthetic
