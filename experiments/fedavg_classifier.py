r"""Trains an image classifier with user-level DP-FedAvg and writes the workdir contract.

Example (2 idle CPU cores, 20-30 s; measured 2026-12-04):

  .venv/bin/python -m experiments.fedavg_classifier --dataset=mnist5k --num_clients=100 \
    --clients_per_round=10 --rounds=20 --noise_multiplier=1.0 --l2_clip=0.5 \
    --workdir=workdirs/fedavg

gives test accuracy 62.2% at user-level eps 4.225 (RDP, printed rounded up; PLD 3.591),
delta 1e-5: 100 users make user-level eps large (WORKSPACE.md, "DP-FedAvg classifier").

Privacy: the unit is one user (client): all of its examples may change. --sampling=poisson
(the default) is accounted under add/remove-one, --sampling=fixed under replace-one.

Non-private FedAvg: add --nodp. Adaptive clipping (Andrew et al. 2021): --adaptive_clipping
(--l2_clip is then the initial clip norm). Rerunning the same command on the same workdir
resumes from its last checkpoint, privacy ledger included. Multi-host (TPU pod slice, SLURM,
or several processes on one machine): launch on every host with --distributed (see
launch/multihost.py); process 0 writes the workdir. An empirical check of the privacy
accounting: --audit_canaries=1000 (audit.json: the final model's canary scores, and
`all_rounds`, every round's release: the sensitivity and noise the run adds, measured;
WORKSPACE.md, "Auditing a training run with canaries").
"""

from absl import flags

from dpfed import data, privacy
from dpfed.federated import classifier
from dpfed.models import layers
from dpfed.train import cli
from dpfed.train.config import ConfigError

_DATASET = flags.DEFINE_enum("dataset", "mnist5k", data.list_datasets(), "Dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir for tfds datasets.")
_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "mlp", "logreg"], "Classifier.")
_CONV = flags.DEFINE_enum(
    "conv", "auto", list(layers.CONV_IMPLS),
    "CNN convolutions: xla (nn.Conv), patches (im2col; several times faster in the "
    "engine on CPU and GPU), auto (patches on CPU and GPU, nn.Conv elsewhere).")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 100, "Users the data is split into.")
_PARTITION = flags.DEFINE_enum(
    "partition", "iid", list(classifier.PARTITIONS),
    "Split: iid; dirichlet (each class over clients in Dir(alpha) shares, unequal sizes; "
    "Yurochkin et al. 2019); dirichlet_mix (each client's class mix ~ Dir(alpha p), equal "
    "sizes, any client count; Hsu et al. 2019); natural (one client per user of the "
    "dataset, e.g. celeb_a's identities; --num_clients must be their number).")
_ALPHA = flags.DEFINE_float("dirichlet_alpha", 0.5, "Label skew of the dirichlet splits.")
_ROUNDS = flags.DEFINE_integer("rounds", 100, "Federated rounds.")
_PER_ROUND = flags.DEFINE_integer(
    "clients_per_round", 10, "Expected (poisson) or exact (fixed) clients per round.")
_LOCAL_STEPS = flags.DEFINE_integer("local_steps", 5, "Client optimiser steps per round.")
_LOCAL_BATCH = flags.DEFINE_integer("local_batch_size", 20, "Examples per local step.")
_CLIENT_LR = flags.DEFINE_float("client_learning_rate", 0.05, "Client SGD learning rate.")
_SERVER_OPT = flags.DEFINE_enum(
    "server_optimizer", "sgd", list(classifier.OPTIMIZERS), "Server optimiser.")
_SERVER_LR = flags.DEFINE_float("server_learning_rate", 1.0, "Server learning rate.")
_CLIP = flags.DEFINE_float("l2_clip", 0.5, "Per-user update clip norm C (initial if adaptive).")
_NOISE = flags.DEFINE_float("noise_multiplier", None, "Noise std / C (1.0 if no target eps).")
_TARGET = flags.DEFINE_float("target_epsilon", None, "Calibrate noise to this eps at --rounds.")
_DELTA = flags.DEFINE_float("delta", 1e-5, "delta of the user-level (eps, delta) guarantee.")
_ADAPTIVE = flags.DEFINE_bool("adaptive_clipping", False, "Track a quantile of update norms.")
_QUANTILE = flags.DEFINE_float("target_quantile", 0.5, "Adaptive clipping: target quantile.")
_CLIP_LR = flags.DEFINE_float("clip_learning_rate", 0.2, "Adaptive clipping: eta.")
_COUNT_STD = flags.DEFINE_float(
    "clipped_count_stddev", None, "Adaptive clipping: count noise std (clients_per_round/20).")
_SAMPLING = flags.DEFINE_enum("sampling", "poisson", ["poisson", "fixed"], "Client sampling.")
_NODP = flags.DEFINE_bool("nodp", False, "Non-private FedAvg: no clipping, no noise.")
cli.define_seed_flag(0)
cli.define_secret_seed_flag()
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "Evaluate every N rounds.")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 10, "Checkpoint period in rounds.")
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Clients per pass of a round.")
_PER_STEP = flags.DEFINE_integer(
    "clients_per_device_step", None, "Clients vmapped at once per device (1 on CPU).")
_AUDIT = cli.define_audit_flag("clients")
_INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "workdir", f"unexpected arguments {argv[1:]}")
    _INITIALIZE_DISTRIBUTED()
    noise = _NOISE.value
    if noise is None and _TARGET.value is None and not _NODP.value:
        noise = 1.0  # the flag's documented default; a --nodp run has no noise to set
    try:
        config = classifier.FedAvgClassifierConfig(
            dataset=_DATASET.value,
            model=_MODEL.value,
            conv=_CONV.value,
            num_clients=_NUM_CLIENTS.value,
            partition=_PARTITION.value,
            dirichlet_alpha=_ALPHA.value,
            rounds=_ROUNDS.value,
            clients_per_round=_PER_ROUND.value,
            local_steps=_LOCAL_STEPS.value,
            local_batch_size=_LOCAL_BATCH.value,
            client_learning_rate=_CLIENT_LR.value,
            server_optimizer=_SERVER_OPT.value,
            server_learning_rate=_SERVER_LR.value,
            l2_clip=_CLIP.value,
            noise_multiplier=noise,
            target_epsilon=_TARGET.value,
            delta=_DELTA.value,
            adaptive_clipping=_ADAPTIVE.value,
            target_quantile=_QUANTILE.value,
            clip_learning_rate=_CLIP_LR.value,
            clipped_count_stddev=_COUNT_STD.value,
            sampling=_SAMPLING.value,
            nodp=_NODP.value,
            **cli.seed_fields(_WORKDIR.value),
            eval_every=_EVAL_EVERY.value,
            checkpoint_every=_CKPT_EVERY.value,
            chunk_size=_CHUNK.value,
            clients_per_device_step=_PER_STEP.value,
            data_dir=_DATA_DIR.value,
            audit_canaries=_AUDIT.value,
        )
        cli.refuse_unused(classifier.unused_flags(config))
        summary = classifier.train(config, _WORKDIR.value)
    except ConfigError as error:
        raise cli.FlagError(error.field, error.message) from error
    except data.DatasetUnavailableError as error:
        raise cli.FlagError("dataset", str(error)) from error
    eps = summary["epsilon_rdp"]
    privacy_text = (
        "non-private" if eps is None
        else f"user-level eps {privacy.format_upper(eps)} (RDP), delta {config.delta:g}")
    print(
        f"test accuracy {summary['test_accuracy']:.4f} after {summary['rounds']} rounds | "
        f"{privacy_text} | report: {_WORKDIR.value}/report.md"
    )


if __name__ == "__main__":
    cli.run(main)
