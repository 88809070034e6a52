"""Checkpoints that hold the train state and the privacy ledger together (orbax).

One orbax step directory holds both the state pytree (`state/`) and a JSON dict
(`extra/`, where the privacy ledger goes). Orbax writes the step into a temporary
directory and renames it when complete, so a crash leaves either the whole step or
none of it, and the state can never run ahead of the ledger that accounts for it.
Saving is synchronous: when `save` returns, the step is on disk.
"""

import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dpfed.train import workdir as workdir_lib
from dpfed.train.config import ConfigError


class _DropOrbaxInfo(logging.Filter):
    """Drops orbax's INFO/DEBUG records (several per save) from the absl logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        return not from_orbax or record.levelno >= logging.WARNING


_ORBAX_FILTER = _DropOrbaxInfo()


def _silence_orbax() -> None:
    for name in ("absl", "orbax"):
        logger = logging.getLogger(name)
        if _ORBAX_FILTER not in logger.filters:
            logger.addFilter(_ORBAX_FILTER)


def _is_typed_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys (`jax.random.key`) replaced by their raw uint32 key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _data_to_keys(restored: Any, template: Any) -> Any:
    """Wraps restored key data back into typed keys wherever `template` has one."""

    def rewrap(template_leaf: Any, leaf: Any) -> Any:
        if _is_typed_key(template_leaf):
            return jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(template_leaf))
        return leaf

    return jax.tree.map(rewrap, template, restored)


class _Manager(ocp.CheckpointManager):
    """orbax's manager, but it never asks jax's preemption service for a sync point.

    orbax's `save` asks `multihost_utils.reached_preemption_sync_point` with the step
    it saves; `preemption.reached` numbers its own calls of it. jax's service takes the
    last number any call gave as this process's position: a notice that came during (or
    right after) a save of a resumed run (step 500, say, where `reached` had counted 3)
    set the sync point at 501, which `reached` met only 497 steps later: the SIGTERM was
    lost. The loops here decide when to save; orbax needs no say.
    """

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


class Checkpointer:
    """Saves and restores `(state, extra)` pairs under `directory/<step>/`.

    `state` is a pytree of arrays and Python scalars (params, optimizer state, step
    counters, PRNG keys: raw `uint32` key data or typed `jax.random.key`s, which come
    back typed when the template has a typed key). `extra` is a JSON-able dict (the
    privacy ledger); numpy/jax values in it are stored as Python numbers/lists.
    Only the newest `max_to_keep` steps are kept.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        """Opens (creating) `directory`.

        Raises:
          ConfigError: naming "workdir", where `directory` is a file (orbax's
            NotADirectoryError traceback, after the run's data and model were loaded).
        """
        _silence_orbax()
        self._directory = pathlib.Path(directory).absolute()
        if self._directory.exists() and not self._directory.is_dir():
            raise ConfigError(
                "workdir", f"{self._directory} must be the checkpoints' directory, but it is "
                "a file: move it away or use a new workdir")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        self._manager = _Manager(self._directory, options=options)
        # The manager removes half-written steps of a killed run in a background thread
        # that its close() does not wait for; a process exiting soon after (a bad flag
        # found after opening the checkpoints) killed it mid-way, with a traceback, also
        # where no one closes the checkpointer. Nothing is read before it is done anyway.
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()

    @property
    def directory(self) -> pathlib.Path:
        """The directory holding one subdirectory per saved step."""
        return self._directory

    def save(self, step: int, state: Any, extra: dict) -> None:
        """Saves `state` and `extra` as one checkpoint; returns once it is on disk.

        Raises:
          ValueError: if `step` is not newer than the latest saved step (orbax would
            silently skip such a save).
        """
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"cannot save step {step}: step {latest} is already saved")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_keys_to_data(state)),
            extra=ocp.args.JsonSave(workdir_lib.to_jsonable(extra)),
        )
        saved = self._manager.save(step, args=args)
        self._manager.wait_until_finished()
        if not saved:
            raise RuntimeError(f"orbax declined to save step {step} in {self._directory}")

    def latest_step(self) -> int | None:
        """The newest completely written step, or None if there is none."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All completely written steps, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def _existing(self, step: int | None) -> int:
        """`step`, or the latest step when None; FileNotFoundError if it is not saved."""
        if step is None:
            step = self.latest_step()
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self._directory}")
        return step

    def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Returns `(state, extra)` of `step` (default: the latest step).

        Arrays come back with the dtypes, shapes (and shardings) of the matching
        leaves of `state_template`, which may hold arrays or `jax.ShapeDtypeStruct`s.

        Raises:
          FileNotFoundError: if there is no checkpoint (of `step`) to restore.
        """
        step = self._existing(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_keys_to_data(state_template)),
            extra=ocp.args.JsonRestore(),
        )
        restored = self._restore(step, args)
        state = _data_to_keys(restored.state, state_template)
        return state, workdir_lib.from_jsonable(restored.extra)

    def restore_extra(self, step: int | None = None) -> dict:
        """Returns the `extra` dict of `step` (default: the latest) without its state.

        Raises:
          FileNotFoundError: if there is no checkpoint (of `step`) to read.
        """
        args = ocp.args.Composite(extra=ocp.args.JsonRestore())
        restored = self._restore(self._existing(step), args)
        return workdir_lib.from_jsonable(restored.extra)

    def _restore(self, step: int, args: ocp.args.Composite) -> Any:
        """orbax's restore of `step`; a damaged step raises one line that says what to do.

        Raises:
          ConfigError: naming "workdir", when orbax cannot read the step (a truncated
            or missing file); the message names the step and an older one to fall back on.
        """
        try:
            restored = self._manager.restore(step, args=args)
            if "extra" in args.keys():
                workdir_lib.as_object(restored.extra)
            return restored
        except Exception as error:  # orbax, tensorstore and json raise many kinds
            older = [s for s in self.all_steps() if s < step]
            since = f"resume from step {older[-1]}" if older else "replay the run from its start"
            # A damaged step, or one the code no longer reads (a changed model or state):
            # moving steps out helps only the first, and would discard them all for the second.
            remedy = (f"if its files are damaged, move {self._directory / str(step)} out of "
                      f"checkpoints/ to {since}; if the code changed since it was written, "
                      "resume with that code or use a new workdir")
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise ConfigError(
                "workdir",
                f"checkpoint {step} in {self._directory} cannot be read ({reason}): {remedy}",
            ) from error

    def close(self) -> None:
        """Waits for pending work and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
