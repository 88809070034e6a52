"""Telling the user when a run's model diverged: NaN or inf in its parameters or loss.

A learning rate too large for the clip and noise drives the parameters or the logits to
inf and then NaN; the run went on, spent its whole budget on a broken model, and its
summary showed a chance accuracy and a NaN loss with nothing said (found 2026-12-03:
DP-SGD CNN at lr 1e30 keeps finite parameters of ~1e30 whose logits overflow). The
trainers check at every evaluation (`DivergenceWatch.check`): the parameters, and every
figure of the evaluation record whose name ends in "loss". The first failing check prints
one warning naming the step; summary.json's `diverged` says whether the final state fails
it, and the reports say so. The run is not stopped: its steps, ledger and resume are
those of its flags. Parameters and logged losses are releases (DP post-processing), so
whether they are finite is one too.
"""

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@jax.jit
def _finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` holds only finite numbers."""
    return bool(_finite(tree))


def nonfinite_losses(record: dict[str, Any]) -> list[str]:
    """The names of `record`'s figures named "...loss" that are NaN or inf, sorted."""
    return sorted(name for name, value in record.items()
                  if name.endswith("loss") and isinstance(value, numbers.Real)
                  and not math.isfinite(value))


def diverged(params: Any, record: dict[str, Any]) -> bool:
    """Whether `params` hold NaN or inf, or a loss of the evaluation `record` is."""
    return bool(nonfinite_losses(record)) or not all_finite(params)


@dataclasses.dataclass
class DivergenceWatch:
    """Checks a run at its evaluations; warns once, at the first sign of divergence.

    Attributes:
      unit: "step" or "round", for the warning.
      log: where the warning goes.
      label: names the run in the warning (e.g. "fedgan[low]"), or "".
      diverged_at: the step or round of the first failed check (None: none yet).
    """

    unit: str
    log: Callable[[str], None] = print
    label: str = ""
    diverged_at: int | None = None

    def check(self, params: Any, record: dict[str, Any], done: int) -> None:
        """Warns (once) if `params` after `done` steps or rounds, or a loss of their
        evaluation `record`, hold NaN or inf."""
        if self.diverged_at is not None or not diverged(params, record):
            return
        self.diverged_at = done
        what = ", ".join(nonfinite_losses(record)) or "the parameters"
        prefix = f"[{self.label}] " if self.label else ""
        self.log(f"{prefix}warning: NaN or inf in {what} after {self.unit} {done}: the model "
                 "diverged (smaller learning rates?); the run goes on as its flags say")


def report_line(summary: dict) -> str:
    """A report's line for a diverged model; empty when it did not diverge."""
    if not summary.get("diverged"):
        return ""
    return "- **the model diverged: NaN or inf in its final parameters or loss**\n"
