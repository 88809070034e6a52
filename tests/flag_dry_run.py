"""Runs a trainer binary's `main` up to its trainer, for several command lines, without
training: what each one's flags do to the binary's checks and config (`tests/launch/
test_flagfiles.py`, and by hand on a document's commands).

    python -m tests.flag_dry_run experiments.dpsgd_classifier '[["--flagfile=f.flags"]]'

prints one JSON line: for each command line, "ok" where `main` reached its trainer (the
flags parse, pass the binary's checks, `cli.refuse_unused` included, and build its
config), else the one-line error the binary would exit 2 with. Commands need no
`--workdir` (a temporary folder each is added, removed at the end: the trainer does not
run, but reading the seed, `cli.seed_fields`, opens the workdir).
"""

import importlib
import json
import pathlib
import sys
import tempfile

from absl import flags

from dpfed.train import cli

# The trainer each binary's `main` calls once its config is built: (module, attribute).
TRAINERS = (
    ("dpfed.train.dpsgd", "train"),
    ("dpfed.federated.classifier", "train"),
    ("dpfed.generative.fedgan_debug", "run"),
    ("dpfed.generative.fedlm_debug", "run"),
    ("dpfed.generative.dpd_fvae", "train"),
    ("dpfed.generative.datalens", "train"),
)


class _ReachedTrainerError(Exception):
    """Raised in place of training: the config was built and accepted."""


def _stop(*args, **kwargs):
    raise _ReachedTrainerError


def dry_run(module: str, commands: list[list[str]]) -> list[str]:
    """"ok" or the binary's error line for each of `commands` (argument lists)."""
    for name, attribute in TRAINERS:
        setattr(importlib.import_module(name), attribute, _stop)
    binary = importlib.import_module(module)
    results = []
    with tempfile.TemporaryDirectory(prefix="flag_dry_run.") as scratch:
        for number, args in enumerate(commands):
            workdir = pathlib.Path(scratch) / str(number)  # one each: no run sees another's
            flags.FLAGS.unparse_flags()
            try:
                argv = flags.FLAGS([module, *args, f"--workdir={workdir}"])
                binary.main(argv)
                results.append("main returned without reaching its trainer")
            except _ReachedTrainerError:
                results.append("ok")
            except (cli.FlagError, flags.Error) as error:
                results.append(str(error))
    return results


if __name__ == "__main__":
    print(json.dumps(dry_run(sys.argv[1], json.loads(sys.argv[2]))))
