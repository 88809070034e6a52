r"""Trains DPD-fVAE (Pfitzner & Arnrich 2022): a federated conditional VAE whose encoders stay
on the clients and whose decoder alone is shared (and made private); writes the workdir
contract, samples per class, and evaluates the released decoder.

Example (the table's non-private sync_d row: 100 IID clients of mnist5k, 50 rounds of 10
local epochs, beta 1; 2 CPU cores: 8-13 min of training):

  .venv/bin/python -m experiments.dpd_fvae \
    --flagfile=launch/tables/dpd_fvae/02_nodp_sync_d.flags --evaluate \
    --workdir=workdirs/dpd_fvae_nodp_d

(`--evaluate`, given after the flagfile, overrides its `--noevaluate`, which the table's
runs keep) gave fid_domain 117.0 and train-on-synthetic CNN 86.1% on the real test split
(evaluated with `experiments.evaluate`, 4,000 samples as --evaluate draws; WORKSPACE.md,
"DPD-fVAE", which also shows why beta is 1 rather than the paper's 0.01).

Modes: --dp=none|central|local, --sync=d (decoder shared: DPD-fVAE)|ed (encoder and
decoder shared: the plain fVAE). --target_epsilon calibrates the noise when
--noise_multiplier is not given (central: over --rounds rounds; local: over the expected
ceil(rounds * client_fraction) participations of a client), and is a budget: central runs
stop before exceeding it, local clients stop training when theirs is spent. The unit of
privacy: central, one user (client: all of its images), user-level DP-FedAvg on what is
shared; local, one example of a client (per-example DP-SGD on each client, the ledger
stating the worst client's eps); both accounted under add/remove-one (Poisson sampling).
Rerunning the same command on the same workdir resumes from its last checkpoint. With
--evaluate (the default) the decoder is then evaluated by `dpfed.eval.evaluation`
(fid_domain, CNN/MLP/LogReg train-on-synthetic accuracy on the real test split) with
--num_synthetic samples; `launch/reproduce.py --table=dpd_fvae` runs the rows with
--noevaluate and evaluates them with `experiments.evaluate`. An empirical check of the
central ledger: --dp=central --audit_canaries=1000 (audit.json;
WORKSPACE.md, "Auditing a training run with canaries").
"""

from absl import flags

from dpfed import data, privacy
from dpfed.generative import dpd_fvae
from dpfed.train import cli, seeds
from dpfed.train.config import ConfigError

_D = dpd_fvae.DpdFvaeConfig()

_DATASET = flags.DEFINE_enum("dataset", _D.dataset, data.list_datasets(), "Dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir for tfds datasets.")
_NUM_CLIENTS = flags.DEFINE_integer(
    "num_clients", _D.num_clients, "IID clients (the paper: 500 on MNIST).")
_FRACTION = flags.DEFINE_float(
    "client_fraction", _D.client_fraction, "Poisson rate q of client sampling per round.")
_ROUNDS = flags.DEFINE_integer("rounds", _D.rounds, "Federated rounds.")
_EPOCHS = flags.DEFINE_integer("local_epochs", _D.local_epochs, "Local epochs per round.")
_BATCH = flags.DEFINE_integer("batch_size", _D.batch_size, "Local batch (expected, if local DP).")
_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", _D.optimizer, list(dpd_fvae.OPTIMIZERS), "Client optimiser.")
_LR = flags.DEFINE_float("learning_rate", _D.learning_rate, "Client learning rate.")
_LATENT = flags.DEFINE_integer("latent_dim", _D.latent_dim, "Latent size (paper: 8; CelebA 16).")
_ENC = flags.DEFINE_list(
    "encoder_features", [str(f) for f in _D.encoder_features], "Encoder conv widths.")
_DEC = flags.DEFINE_list(
    "decoder_features", [str(f) for f in _D.decoder_features], "Decoder conv-transpose widths.")
_BETA = flags.DEFINE_float("beta", _D.beta, "KL weight of the loss.")
_SYNC = flags.DEFINE_enum(
    "sync", _D.sync, list(dpd_fvae.SYNCS), "d: decoder shared; ed: encoder and decoder.")
_DP = flags.DEFINE_enum("dp", _D.dp, list(dpd_fvae.DP_MODES), "Privacy mode.")
_CLIP = flags.DEFINE_float(
    "l2_clip", _D.l2_clip, "C: per-client delta clip (central) or per-example (local).")
_NOISE = flags.DEFINE_float(
    "noise_multiplier", None, "z; default: calibrated to --target_epsilon if given, else 1.0.")
_TARGET = flags.DEFINE_float("target_epsilon", None, "eps budget (calibrates z if not given).")
_DELTA = flags.DEFINE_float("delta", _D.delta, "delta of the (eps, delta) guarantee.")
_MICRO = flags.DEFINE_integer(
    "microbatch_size", None, "Local DP: per-example gradients materialised at once.")
cli.define_seed_flag(_D.seed)
cli.define_secret_seed_flag()
_EVAL_EVERY = flags.DEFINE_integer("eval_every", _D.eval_every, "Log metrics every N rounds.")
_CKPT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", _D.checkpoint_every, "Checkpoint period in rounds.")
_NUM_SYNTHETIC = flags.DEFINE_integer(
    "num_synthetic", 4000, "Class-balanced synthetic samples evaluated (with --evaluate).")
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Evaluate the decoder when training ends.")
_AUDIT = cli.define_audit_flag("clients")
_INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()  # multi-host: launch/multihost.py
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def _widths(flag: flags.FlagHolder) -> tuple[int, ...]:
    try:
        return tuple(int(f) for f in flag.value)
    except ValueError as error:
        raise cli.FlagError(flag.name, "must be a list of integers") from error


def _config() -> dpd_fvae.DpdFvaeConfig:
    return dpd_fvae.DpdFvaeConfig(
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        num_clients=_NUM_CLIENTS.value,
        client_fraction=_FRACTION.value,
        rounds=_ROUNDS.value,
        local_epochs=_EPOCHS.value,
        batch_size=_BATCH.value,
        optimizer=_OPTIMIZER.value,
        learning_rate=_LR.value,
        latent_dim=_LATENT.value,
        encoder_features=_widths(_ENC),
        decoder_features=_widths(_DEC),
        beta=_BETA.value,
        sync=_SYNC.value,
        dp=_DP.value,
        l2_clip=_CLIP.value,
        noise_multiplier=_NOISE.value,
        target_epsilon=_TARGET.value,
        delta=_DELTA.value,
        microbatch_size=_MICRO.value,
        **cli.seed_fields(_WORKDIR.value),
        eval_every=_EVAL_EVERY.value,
        checkpoint_every=_CKPT_EVERY.value,
        audit_canaries=_AUDIT.value,
    )


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "workdir", f"unexpected arguments {argv[1:]}")
    _INITIALIZE_DISTRIBUTED()
    cli.check(_NUM_SYNTHETIC.value >= 20, "num_synthetic", "must be >= 20")
    try:
        config = _config()
        cli.refuse_unused(dpd_fvae.unused_flags(config, _EVALUATE.value))
        summary = dpd_fvae.train(config, _WORKDIR.value)
    except ConfigError as error:
        raise cli.FlagError(error.field, error.message) from error
    except data.DatasetUnavailableError as error:
        raise cli.FlagError("dataset", str(error)) from error
    eps = summary["epsilon_rdp"]
    line = f"{summary['mode']} after {summary['rounds']} rounds | " + (
        "non-private" if eps is None
        else f"eps {privacy.format_upper(eps)} (RDP), delta {config.delta:g}, "
        f"unit {summary['unit']}")
    if _EVALUATE.value:
        from dpfed.eval import evaluation

        line += evaluation.evaluate_generator(
            _WORKDIR.value, _NUM_SYNTHETIC.value, seeds.evaluation_seed(config))
    print(f"{line} | report: {_WORKDIR.value}/report.md")


if __name__ == "__main__":
    cli.run(main)
