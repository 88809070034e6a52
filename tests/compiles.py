"""Counts the XLA compilations a block of code causes, by function name (shared by tests
that pin a loop's compilations)."""

import collections
import contextlib
import logging
from collections.abc import Iterator

import jax

_PREFIX = "Finished XLA compilation of jit("


class _Counter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(_PREFIX):
            self.counts[message[len(_PREFIX):].split(")", 1)[0]] += 1


@contextlib.contextmanager
def counted() -> Iterator[collections.Counter[str]]:
    """`with counted() as counts:` then `counts["name"]`: how many times a jitted function
    called `name` was compiled inside the block (with `jax_log_compiles` on there; a
    persistent compilation cache hit counts too, as it would cost a compile without one)."""
    counter = _Counter()
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    try:
        with jax.log_compiles(True):
            yield counter.counts
    finally:
        logger.removeHandler(counter)
