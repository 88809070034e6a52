"""A binary for tests/test_forked.py: its first argument says what it does."""

import atexit
import os
import sys
import threading
import time


def main(what: str) -> None:
    if what == "exit3":
        print("out")
        print("err", file=sys.stderr)
        sys.exit(3)
    elif what == "raise":
        raise RuntimeError("a bug")
    elif what == "message":
        sys.exit("a message")
    elif what == "parent":
        print(os.getppid(), os.environ.get("DPFED_FORKED_PROBE"))
    elif what == "backend":
        import jax
        from jax._src import xla_bridge

        print(len(xla_bridge._backends), jax.device_count())  # noqa: SLF001
    elif what == "shutdown":
        atexit.register(print, "atexit")
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread"))).start()
        print("main")
    elif what == "hang":
        print("waiting", file=sys.stderr, flush=True)
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1])
