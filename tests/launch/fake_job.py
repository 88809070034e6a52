"""A stand-in job for `launch.multihost local`'s tests: processes that fail or hang.

Each process writes its pid to `--pid_dir/<process_id>.pid` once its SIGTERM handling is
set. With `--mode=fail`, process 1 exits with code 3 after 3 s (the others have written
theirs by then). With `--mode=preempted`, process 0 sleeps until a SIGTERM ends it (as a
run that saved its round exits 143); with `--mode=fail_on_sigterm`, process 1 exits with
code 3 on a SIGTERM; with `--mode=done_on_sigterm`, every process exits with 0 on a SIGTERM
(a run that had finished); with `--mode=done_first`, process 0 exits with 0 at once and the
others with 3 after 0.5 s (a job whose process 0 ends before the others fail). Every other
process ignores SIGTERM (as a process blocked in a collective does) and sleeps `--sleep_s`,
so only a kill stops it sooner.
"""

import argparse
import os
import pathlib
import signal
import sys
import time


def _exit_3(signum, frame):
    sys.exit(3)


def _exit_0(signum, frame):
    sys.exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--pid_dir", required=True)
    parser.add_argument("--mode", choices=("fail", "preempted", "fail_on_sigterm",
                                           "done_on_sigterm", "done_first"),
                        default="fail")
    parser.add_argument("--sleep_s", type=float, default=600.0)
    args, _ = parser.parse_known_args()
    if args.mode == "done_on_sigterm":
        signal.signal(signal.SIGTERM, _exit_0)
    elif args.mode == "fail_on_sigterm" and args.process_id == 1:
        signal.signal(signal.SIGTERM, _exit_3)
    elif not (args.mode == "preempted" and args.process_id == 0):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pathlib.Path(args.pid_dir, f"{args.process_id}.pid").write_text(str(os.getpid()))
    if args.mode == "done_first":
        time.sleep(0.5 if args.process_id else 0.0)
        sys.exit(3 if args.process_id else 0)
    if args.mode == "fail" and args.process_id == 1:
        time.sleep(3.0)
        sys.exit(3)
    time.sleep(args.sleep_s)
