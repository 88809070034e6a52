r"""Finds an inversion bug in private federated images with DP federated GANs (P0).

Augenstein et al., "Generative Models for Effective ML on Private, Decentralized
Datasets" (ICLR 2020). The CPU demo (`make demo`; 2 CPU cores, a few minutes; shrunken
networks, 200 clients of mnist5k, half of them with inverted images):

  .venv/bin/python -m experiments.fedgan_debug --workdir=workdirs/fedgan_debug \
    --flagfile=launch/demo.flags

(launch/demo.flags holds the demo's settings: 150 rounds of 5 clients at z 0.5, the
shrunken networks and the 4x learning rates.)

Expected: the low-accuracy GAN's samples are inverted (inverted fraction near 1), the
high-accuracy GAN's are not (near 0); report.md shows both grids and each GAN's
user-level eps (measured figures: WORKSPACE.md, "P0"). The flag defaults are the paper's
networks and round (10 clients per round, 1000 rounds, learning rates 5e-4 / 5e-3):
hours on a CPU. The demo's 4x learning rates let its 150 rounds draw digit shapes.
Federated EMNIST: --dataset=emnist --emnist_dir=DIR with TFF's fed_emnist_{train,test}.h5.
Both files hold the same writers, so the app's classifier trains on the last
--emnist_classifier_writers writers (id order; both files), held out of the clients.
End to end: --group_sampling=population with --low_threshold/--high_threshold (rounds
sample all users, a group's users taking part; the group sizes are released noised, with
their own ledger): the report then states an eps that takes nothing as given.
The unit of privacy is one user (client: all of its images); --sampling=poisson (the
default) is accounted under add/remove-one, --sampling=fixed under replace-one.
An empirical check of each GAN's accounting: --audit_canaries=1000 (canary users in D's
updates; audit.json; WORKSPACE.md, "Auditing a training run with canaries").
Rerunning the same command on the same workdir resumes both GANs, privacy ledgers
included; a rerun that changes a flag other than --rounds, --eval_every,
--checkpoint_every, --num_samples or --emnist_dir exits 2 naming it.
"""

from absl import flags

from dpfed import data
from dpfed.generative import debug_flags, fedgan_debug, selection
from dpfed.train import cli, dpsgd

_D = fedgan_debug.DebugConfig()

_DATASET = flags.DEFINE_enum("dataset", _D.dataset, list(fedgan_debug.DATASETS), "Images.")
_EMNIST_DIR = flags.DEFINE_string("emnist_dir", None, "Folder of fed_emnist_*.h5 (emnist).")
_EMNIST_MAX = flags.DEFINE_integer("emnist_max_clients", None, "Clients: first N not held out.")
_EMNIST_CLS = flags.DEFINE_integer(
    "emnist_classifier_writers",
    _D.emnist_classifier_writers,
    "emnist: the last N writers (id order) train the app's classifier, not as clients.",
)
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", _D.num_clients, "mnist5k: users.")
_BUG = flags.DEFINE_float("bug_fraction", _D.bug_fraction, "Fraction p of inverted clients.")
_CLS_EPOCHS = flags.DEFINE_integer("classifier_epochs", _D.classifier_epochs, "App CNN epochs.")
# The split, cohorts, DP, seed and cadence: the settings both debug demos have.
_DEBUG_FLAGS = debug_flags.define_debug_flags(
    _D, model="GAN", metric="Accuracy", update="D's delta", paper_thresholds=(0.882, 0.939))
_ADAPTIVE = flags.DEFINE_bool("adaptive_clipping", _D.adaptive_clipping, "Adaptive clip norm.")
_D_CONV = flags.DEFINE_list("d_conv_features", list(map(str, _D.d_conv_features)), "D convs.")
_D_DENSE = flags.DEFINE_integer("d_dense_features", _D.d_dense_features, "D dense width.")
_G_DENSE = flags.DEFINE_integer("g_dense_features", _D.g_dense_features, "G dense width.")
_G_BASE = flags.DEFINE_integer("g_base_features", _D.g_base_features, "G 7x7 channels.")
_G_CONVT = flags.DEFINE_list("g_convt_features", list(map(str, _D.g_convt_features)), "G convT.")
_NOISE_DIM = flags.DEFINE_integer("noise_dim", _D.noise_dim, "G's noise dimension.")
_BATCH = flags.DEFINE_integer("batch_size", _D.batch_size, "Images per D / G step.")
_D_STEPS = flags.DEFINE_integer("client_d_steps", _D.client_d_steps, "Client D steps.")
_G_STEPS = flags.DEFINE_integer("server_g_steps", _D.server_g_steps, "Server G steps.")
_D_LR = flags.DEFINE_float("client_d_learning_rate", _D.client_d_learning_rate, "D SGD lr.")
_G_LR = flags.DEFINE_float("server_g_learning_rate", _D.server_g_learning_rate, "G SGD lr.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", _D.num_samples, "Samples per GAN measured.")
_AUDIT = cli.define_audit_flag("clients per GAN")
_INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()  # multi-host: launch/multihost.py
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def _widths(flag) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in flag.value)
    except ValueError as error:
        raise cli.FlagError(
            flag.name, f"must be comma-separated integers, got {flag.value}"
        ) from error


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "workdir", f"unexpected arguments {argv[1:]}")
    _INITIALIZE_DISTRIBUTED()
    try:
        config = fedgan_debug.DebugConfig(
            dataset=_DATASET.value,
            emnist_dir=_EMNIST_DIR.value,
            emnist_max_clients=_EMNIST_MAX.value,
            emnist_classifier_writers=_EMNIST_CLS.value,
            num_clients=_NUM_CLIENTS.value,
            bug_fraction=_BUG.value,
            classifier_epochs=_CLS_EPOCHS.value,
            adaptive_clipping=_ADAPTIVE.value,
            d_conv_features=_widths(_D_CONV),
            d_dense_features=_D_DENSE.value,
            g_dense_features=_G_DENSE.value,
            g_base_features=_G_BASE.value,
            g_convt_features=_widths(_G_CONVT),
            noise_dim=_NOISE_DIM.value,
            batch_size=_BATCH.value,
            client_d_steps=_D_STEPS.value,
            server_g_steps=_G_STEPS.value,
            client_d_learning_rate=_D_LR.value,
            server_g_learning_rate=_G_LR.value,
            num_samples=_NUM_SAMPLES.value,
            audit_canaries=_AUDIT.value,
            **debug_flags.config_fields(_DEBUG_FLAGS),
            **cli.seed_fields(_WORKDIR.value),
        )
        cli.refuse_unused(fedgan_debug.unused_flags(config))
        summary = fedgan_debug.run(config, _WORKDIR.value)
    except dpsgd.ConfigError as error:
        raise cli.FlagError(error.field, error.message) from error
    except data.DatasetUnavailableError as error:  # the folder given, else the dataset
        raise cli.FlagError("emnist_dir" if _EMNIST_DIR.value else "dataset", str(error)) from error
    workdir = _WORKDIR.value
    print(
        f"inverted fraction: low-accuracy GAN {summary['inverted_fraction_low']:.3f}, "
        f"high-accuracy GAN {summary['inverted_fraction_high']:.3f} | "
        + selection.eps_headline(summary)
        + f"\nreport: {workdir}/report.md\ngrids: {workdir}/samples_low.png, "
        f"{workdir}/samples_high.png"
    )


if __name__ == "__main__":
    cli.run(main)
