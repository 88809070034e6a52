"""A stand-in job for `launch.multihost local`'s tests: process 1 fails, the others hang.

Each process writes its pid to `--pid_dir/<process_id>.pid`. Process 1 exits with code 3
after 3 s (the others have written theirs by then); the others ignore SIGTERM (as a
process blocked in a collective does) and sleep, so only a kill stops them.
"""

import argparse
import os
import pathlib
import signal
import sys
import time

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--pid_dir", required=True)
    args, _ = parser.parse_known_args()
    pathlib.Path(args.pid_dir, f"{args.process_id}.pid").write_text(str(os.getpid()))
    if args.process_id == 1:
        time.sleep(3.0)
        sys.exit(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
