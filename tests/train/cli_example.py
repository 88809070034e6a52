"""A test binary: 89.4% at eps 9."""

# The binary of tests/train/test_cli.py. Its docstring is its --help text: its "%" is what
# absl used to %-format with the program's name.

import pathlib

from absl import flags

from dpfed.train import cli

_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "mlp"], "Classifier.")
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "Clip norm.", lower_bound=0.0)
_DELTA = flags.DEFINE_float("delta", 1e-5, "Target delta.")
_CRASH = flags.DEFINE_bool("crash", False, "Raise a RuntimeError in main.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (locked).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "One host of a multi-host job.")
_WRITE = flags.DEFINE_list("write", [], "Files written into the workdir before the checks.")
_DEVICES = flags.DEFINE_bool("devices", False, "Ask jax for its devices (backend probing).")
_SEED = cli.define_seed_flag(0)
cli.define_secret_seed_flag()


def main(argv):
    for name in _WRITE.value:
        path = pathlib.Path(_WORKDIR.value) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    cli.check(_DELTA.value < 1, "delta", "must be < 1")
    if _CRASH.value:
        raise RuntimeError("a bug")
    if _DEVICES.value:
        import jax

        jax.devices()
    if _WORKDIR.value is not None:
        fields = cli.seed_fields(_WORKDIR.value)
        print("seeded", "secret" if fields["secret_seed"] else fields["seed"])
    print("trained", _MODEL.value)


if __name__ == "__main__":
    cli.run(main)
