r"""Trains an image classifier with DP-SGD and writes the workdir contract.

Example (2 idle CPU cores, about 2 minutes; measured 2026-12-04):

  .venv/bin/python -m experiments.dpsgd_classifier --dataset=mnist5k --model=cnn \
    --steps=300 --batch_size=256 --target_epsilon=10 --learning_rate=0.1 \
    --workdir=workdirs/dpsgd

gives test accuracy 88.6% at eps 9.998 (RDP; PLD 8.99), delta 1e-5, noise multiplier 0.917
(WORKSPACE.md, "DP-SGD classifier", has the other rows).

Privacy: the unit is one training example. --sampling=poisson (the default) is accounted
under add/remove-one, --sampling=fixed (batches of exactly --batch_size) under replace-one.

Non-private baseline: add --nodp. Rerunning the same command on the same workdir
resumes from its last checkpoint, privacy ledger included. An empirical check of the
privacy accounting: --audit_canaries=1000 (audit.json: the final model's canary scores,
and under `all_rounds` every step's release's; WORKSPACE.md, "Auditing a training run
with canaries").
"""

from absl import flags

from dpfed import data, privacy
from dpfed.train import cli, dpsgd

_DATASET = flags.DEFINE_enum("dataset", "mnist5k", data.list_datasets(), "Dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir for tfds datasets.")
_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "mlp", "logreg"], "Classifier.")
_STEPS = flags.DEFINE_integer("steps", 500, "Training steps.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 256, "Expected batch size.", lower_bound=1)
_OPT = flags.DEFINE_enum("optimizer", "momentum", list(dpsgd.OPTIMIZERS), "Optimiser.")
_LR = flags.DEFINE_float("learning_rate", 0.5, "Learning rate.")
_CLIP = flags.DEFINE_float("l2_clip", 1.0, "Per-example L2 clip norm C.")
_NOISE = flags.DEFINE_float("noise_multiplier", None, "Noise std / C (1.1 if no target eps).")
_TARGET = flags.DEFINE_float("target_epsilon", None, "Calibrate noise to this eps at --steps.")
_DELTA = flags.DEFINE_float("delta", 1e-5, "delta of the (eps, delta) guarantee.")
_SAMPLING = flags.DEFINE_enum("sampling", "poisson", ["poisson", "fixed"], "Batch sampling.")
_MICRO = flags.DEFINE_integer("microbatch", None, "Per-example grads at a time.")
_CLIPPING = flags.DEFINE_enum(
    "clipping", "vmap", list(dpsgd.CLIPPINGS),
    "vmap: per-example gradients; fast: norms from one batched pass (Dense/Conv models).",
)
_PHYS = flags.DEFINE_integer("physical_batch", None, "Examples per jitted pass.")
_NODP = flags.DEFINE_bool("nodp", False, "Non-private baseline: no clipping, no noise.")
cli.define_seed_flag(0)
cli.define_secret_seed_flag()
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Evaluate every N steps.", lower_bound=1)
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 50, "Checkpoint period.", lower_bound=1)
_AUDIT = cli.define_audit_flag("examples")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "workdir", f"unexpected arguments {argv[1:]}")
    try:
        config = dpsgd.DpSgdConfig(
            dataset=_DATASET.value,
            model=_MODEL.value,
            steps=_STEPS.value,
            batch_size=_BATCH.value,
            optimizer=_OPT.value,
            learning_rate=_LR.value,
            l2_clip=_CLIP.value,
            noise_multiplier=_NOISE.value,
            target_epsilon=_TARGET.value,
            delta=_DELTA.value,
            sampling=_SAMPLING.value,
            microbatch=_MICRO.value,
            clipping=_CLIPPING.value,
            physical_batch=_PHYS.value,
            nodp=_NODP.value,
            **cli.seed_fields(_WORKDIR.value),
            eval_every=_EVAL_EVERY.value,
            checkpoint_every=_CKPT_EVERY.value,
            data_dir=_DATA_DIR.value,
            audit_canaries=_AUDIT.value,
        )
        cli.refuse_unused(dpsgd.unused_flags(config))
        summary = dpsgd.train(config, _WORKDIR.value)
    except dpsgd.ConfigError as error:
        raise cli.FlagError(error.field, error.message) from error
    except data.DatasetUnavailableError as error:
        raise cli.FlagError("dataset", str(error)) from error
    eps = summary["epsilon_rdp"]
    print(
        f"test accuracy {summary['test_accuracy']:.4f} | "
        + ("non-private" if eps is None
           else f"eps {privacy.format_upper(eps)} (RDP), delta {config.delta:g}")
        + f" | report: {_WORKDIR.value}/report.md"
    )


if __name__ == "__main__":
    cli.run(main)
