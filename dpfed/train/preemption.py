"""Preemption: on SIGTERM, a training loop checkpoints the step it just ran and stops.

A scheduler that preempts a job (a preemptible cloud VM or TPU, Slurm's `scancel`, a
requeue) sends SIGTERM and, a grace period later (e.g. 30 s), SIGKILL. Python's default
SIGTERM ends the process at once: a rerun then resumes from the last periodic checkpoint
and recomputes up to `checkpoint_every` steps (nothing is lost or double-counted either
way: DESIGN.md, "Workdir contract"). Inside `armed()`, a SIGTERM instead asks the loop to
stop: each step ends in `save_or_stop`, which calls `reached()`; once it is True, it saves
the checkpoint of that step (state and ledger together) and raises `PreemptedError`, which
`cli.run` turns into exit code 143 (128 + SIGTERM, what a shell reports for a process
ended by SIGTERM) and one stderr line. Rerunning the same command resumes from that step.

In a `jax.distributed` job (several processes, `--distributed`) every process must save
the same step, since orbax's save is collective. jax's preemption service, started by
`jax.distributed.initialize`, catches SIGTERM in any process and agrees on a step for
all of them (`multihost_utils.reached_preemption_sync_point`); `reached` asks it there,
and `armed()` installs nothing. It needs `reached` called after every step, by every
process, as the loops here do.

A SIGTERM outside a loop (set-up, evaluation, writing the results) keeps Python's
default in a single process: the process ends, as before; so does one that came after the
loop's last `reached()`, once the loop ends (it would otherwise be swallowed).
"""

import contextlib
import itertools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import jax
from jax.experimental import multihost_utils

if TYPE_CHECKING:
    from dpfed.train.checkpoint import Checkpointer

EXIT_CODE = 128 + signal.SIGTERM  # 143

_requested = threading.Event()
_answered = threading.Event()  # `reached()` returned True for the request
_sync_points = itertools.count()


class PreemptedError(Exception):
    """Raised by a training loop once it saved the checkpoint of `step` on preemption."""

    def __init__(self, step: int, unit: str, checkpoints: str):
        super().__init__(
            f"preempted (SIGTERM): the checkpoint of {unit} {step} is saved in "
            f"{checkpoints}; rerun the same command to resume from it")
        self.step = step


def _request(signum: int, frame: object) -> None:
    del signum, frame
    _requested.set()


def _distributed() -> bool:
    return jax.distributed.is_initialized()


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """Within the block, SIGTERM asks the loop to stop at its next `reached()`.

    In a single process, the main thread's SIGTERM handler is replaced for the block
    and restored after it; a request from before the block is forgotten. A request the
    loop did not answer (a SIGTERM after its last `reached()`, e.g. while the last step's
    checkpoint was saved) is passed on to the restored handler as the block ends, as a
    SIGTERM outside a loop: Python's default ends the process there, the last step saved.
    Elsewhere (a `jax.distributed` job, whose SIGTERM jax catches; another thread, which
    cannot set a handler) nothing is installed.
    """
    _requested.clear()
    _answered.clear()
    if _distributed() or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _request)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if _requested.is_set() and not _answered.is_set():
        signal.raise_signal(signal.SIGTERM)


def reached() -> bool:
    """Whether the loop should checkpoint the step it just ran and raise `PreemptedError`.

    Call it once after every step. In a `jax.distributed` job it is True at the same call
    in every process: jax numbers the sync points, here by the calls of this process (the
    same in every process, which run the same loops, and increasing across them, as
    fedgan_debug's two GANs, where the loops' own step numbers start again). That call is
    the one after the fastest process's last call once the processes have agreed on the
    notice, which jax's listener polls for each second: a job stops a second or more
    after the SIGTERM (1-5 steps of the tests' tiny jobs), and never at the first call,
    which a 6-round job SIGTERMed before its loop showed (it stopped at step 2). A job
    whose agreed call comes after its last one runs to its end and exits 0.
    """
    if _distributed():
        return multihost_utils.reached_preemption_sync_point(next(_sync_points))
    if _requested.is_set():
        _answered.set()
        return True
    return False


def checkpoint_due(done: int, every: int, last: int) -> bool:
    """Whether a loop checkpoints its step `done`: every `every` steps, and its `last`."""
    return done % every == 0 or done == last


def save_or_stop(
    done: int, save: Callable[[int], None], checkpointer: "Checkpointer", unit: str, *,
    every: int, last: int
) -> None:
    """The end of a loop's step `done`: its checkpoint and the answer to a preemption.

    Asks `reached()`; calls `save(done)` when the checkpoint is due (`checkpoint_due`: the
    loop's period `every`, its `last` step) or on a request; on a request, then closes
    `checkpointer` and raises `PreemptedError` naming the `unit` ("step", "round") and its
    directory. After a periodic save of a step before the `last` it asks `reached()` again:
    a SIGTERM that came during that save stops the loop there, the step just saved, instead
    of after one more step and its save (the grace period must otherwise cover those too).
    Every process of a job makes the same calls: `due` and the first answer agree.
    """
    preempted = reached()
    due = checkpoint_due(done, every, last)
    if due or preempted:
        save(done)
    if due and not preempted and done != last:
        preempted = reached()
    if preempted:
        checkpointer.close()
        raise PreemptedError(done, unit, str(checkpointer.directory))
