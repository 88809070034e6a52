"""Find a bug in private, decentralized images with DP federated GANs (P0, images).

The image demonstration of "Generative Models for Effective ML on Private,
Decentralized Datasets" (Augenstein et al., ICLR 2020), end to end:
1. federated images: mnist5k's train split in `num_clients` IID clients, or federated
   EMNIST by writer (TFF's HDF5 files) less `emnist_classifier_writers` held-out writers;
2. the bug: after an app update a fraction p of the clients feed inverted images;
3. the app's classifier, trained (non-privately) before the bug on healthy data outside
   the client population (mnist5k's test split, or all examples of the held-out EMNIST
   writers: TFF's test file holds the clients' own writers, so it is no held-out data), is
   evaluated federatedly: each client computes its own accuracy;
4. clients with low accuracy form one group, clients with high accuracy another, and one
   DP-FedAvg-GAN (`dpfed.generative.fedgan`) is trained per group;
5. the modeler looks at both GANs' samples (`samples_low.png`, `samples_high.png`) and,
   here, also measures them: the fraction of inverted samples (`polarity`).
The bug is found when the low-accuracy GAN's samples are inverted and the high
accuracy GAN's are not. Everything is written into one workdir: each GAN trains in its
own sub-workdir (`gan_low/`, `gan_high/`: ledger, metrics, diagnostics, checkpoints,
generator), and the top level holds
- the releases (`dpfed.train.workdir`): summary.json (eps, the samples' inverted
  fractions, group sizes, settings), report.md and the grids;
- `audit.json` (an audit run, `audit_canaries`): each GAN's canary audit of its D
  (`canary_audit.write_audit` in `fedgan.train_gan`, also in its sub-workdir beside its ledger);
- `diagnostics.json`: the simulation's ground truth and figures computed from raw client
  data (which clients are buggy, the groups' real images, per-client accuracies, quantile
  thresholds). Not a DP release, not covered by the guarantee; the report shows them in a
  section of their own so the demo can check itself.
Rerunning resumes both GANs; the top level's config.json pins the settings, so a rerun
with a changed setting (other than `RESUMABLE_FIELDS`) is refused instead of resuming GANs
trained on another population.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
from PIL import Image

from dpfed import data as data_lib
from dpfed import models
from dpfed.data import bugs, emnist_federated
from dpfed.eval import classifier_fit
from dpfed.federated import AdaptiveClipping, describe_user_level_privacy
from dpfed.federated.aggregation import PrivateAggregator
from dpfed.generative import fedgan, group_sizes, polarity, selection, wgan_gp
from dpfed.models import gan
from dpfed.models.output import output
from dpfed.train import run_clock, seeds
from dpfed.train import workdir as workdir_lib
from dpfed.train.config import (
    ConfigError,
    require,
    require_audit_applies,
    require_finite_floats,
    require_secret_seed,
)
from dpfed.train.workdir import AUDIT_FILE, Workdir, params_sha256

PyTree = Any

DATASETS = ("mnist5k", "emnist")
GROUPS = ("low", "high")
GRID_SIDE = 8
# What a rerun on the same workdir may change: how long the GANs train, how often they
# report, where the EMNIST files are, and how many samples of the released generators are
# measured (post-processing of the releases).
RESUMABLE_FIELDS = workdir_lib.RESUMABLE_FIELDS | {"emnist_dir", "num_samples"}
ADAPTIVE_CLIPPING = AdaptiveClipping()  # --adaptive_clipping's settings (TFF/P0 defaults)


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """Everything that defines a run of the image debugging demo (the binary's flags).

    GAN defaults are the paper's (networks, 10 clients per round, 1000 rounds, 6 D and 6
    G steps, learning rates 5e-4 / 5e-3); the CPU demo shrinks widths and rounds.
    """

    dataset: str = "mnist5k"
    emnist_dir: str | None = None
    emnist_max_clients: int | None = None
    emnist_classifier_writers: int = 100
    num_clients: int = 100
    bug_fraction: float = 0.5
    low_threshold: float | None = None
    high_threshold: float | None = None
    low_quantile: float = selection.DEFAULT_LOW_QUANTILE
    high_quantile: float = selection.DEFAULT_HIGH_QUANTILE
    classifier_epochs: int = 10
    rounds: int = 1000
    clients_per_round: float = 10
    sampling: str = "poisson"
    group_sampling: str = "group"
    group_size_noise: float = group_sizes.DEFAULT_GROUP_SIZE_NOISE
    l2_clip: float = 0.1
    noise_multiplier: float = 0.0
    adaptive_clipping: bool = False
    delta: float = 1e-5
    d_conv_features: tuple[int, ...] = (64, 128)  # two (`__post_init__`; a flag takes any)
    d_dense_features: int = 1024
    g_dense_features: int = 1024
    g_base_features: int = 256
    g_convt_features: tuple[int, ...] = (64, 32)  # two, as d_conv_features
    noise_dim: int = gan.NOISE_DIM
    batch_size: int = wgan_gp.BATCH_SIZE
    client_d_steps: int = wgan_gp.CLIENT_D_STEPS
    server_g_steps: int = wgan_gp.SERVER_G_STEPS
    client_d_learning_rate: float = wgan_gp.CLIENT_D_LEARNING_RATE
    server_g_learning_rate: float = wgan_gp.SERVER_G_LEARNING_RATE
    num_samples: int = 1000
    seed: int = 0
    secret_seed: bool = False  # seed drawn by `Workdir.pin_seed`; releases say "secret"
    eval_every: int = 50
    checkpoint_every: int = 50
    audit_canaries: int = 0  # ~K canary users per GAN, ~K held out: `fedgan`

    def __post_init__(self):
        require_finite_floats(self)
        require_secret_seed(self)
        require(self.dataset in DATASETS, "dataset", f"must be one of {DATASETS}")
        require(self.num_clients >= 2, "num_clients", "must be >= 2")
        require(
            self.emnist_max_clients is None or self.emnist_max_clients >= 1,
            "emnist_max_clients",
            "must be >= 1",
        )
        require(self.emnist_classifier_writers >= 1, "emnist_classifier_writers", "must be >= 1")
        for name in ("emnist_dir", "emnist_max_clients"):  # silently ignored before
            require(self.dataset == "emnist" or getattr(self, name) is None, name,
                    f"has no effect with --dataset={self.dataset}: drop it")
        require(0.0 <= self.bug_fraction <= 1.0, "bug_fraction", "must be in [0, 1]")
        require(
            0.0 <= self.low_quantile < self.high_quantile <= 1.0,
            "low_quantile",
            "need 0 <= low_quantile < high_quantile <= 1",
        )
        if self.low_threshold is not None and self.high_threshold is not None:
            require(
                self.low_threshold < self.high_threshold,
                "low_threshold",
                "must be below --high_threshold",
            )
        for name in (
            "classifier_epochs",
            "rounds",
            "num_samples",
            "eval_every",
            "checkpoint_every",
            "noise_dim",
            "batch_size",
            "client_d_steps",
            "server_g_steps",
            "d_dense_features",
            "g_dense_features",
            "g_base_features",
        ):
            require(getattr(self, name) > 0, name, "must be > 0")
        for name in ("d_conv_features", "g_convt_features"):
            require(
                len(getattr(self, name)) == 2 and min(getattr(self, name)) > 0,
                name,
                "must be two positive widths",
            )
        selection.check_training_settings(self)
        require(self.client_d_learning_rate > 0, "client_d_learning_rate", "must be > 0")
        require(self.server_g_learning_rate > 0, "server_g_learning_rate", "must be > 0")
        self.require_noise_split(self.clients_per_round)
        require(not (self.adaptive_clipping and self.noise_multiplier == 0), "adaptive_clipping",
                "adapts the clip from a noised count of clipped updates: with "
                "--noise_multiplier=0 the count is not noised (give a noise multiplier > 0)")
        require_audit_applies(self.audit_canaries, self.noise_multiplier == 0, self.sampling,
                              "--noise_multiplier=0")

    def require_noise_split(self, divisor: float) -> None:
        """With --adaptive_clipping, refuses a z that the engine cannot split between D's
        update (z_d) and the clipped count (2 sb, sb growing with the engine's `divisor`:
        the expected cohort, or q x a group's noised size with population sampling)."""
        if not self.adaptive_clipping:
            return
        try:
            PrivateAggregator(self.noise_multiplier, divisor, ADAPTIVE_CLIPPING)
        except ValueError as error:
            count_multiplier = 2 * ADAPTIVE_CLIPPING.count_stddev(divisor)
            raise ConfigError(
                "noise_multiplier",
                f"{self.noise_multiplier:g} must be below {count_multiplier:.4g} with "
                "--adaptive_clipping: the clipped-count query's noise multiplier at this "
                "--clients_per_round (lower --noise_multiplier or raise --clients_per_round)",
            ) from error

    def gan_config(self) -> wgan_gp.WganGpConfig:
        """The networks and GAN settings of both GANs."""
        d_conv_1, d_conv_2 = self.d_conv_features
        g_convt_1, g_convt_2 = self.g_convt_features
        return wgan_gp.WganGpConfig(
            discriminator=gan.Discriminator(
                conv_features=(d_conv_1, d_conv_2), dense_features=self.d_dense_features
            ),
            generator=gan.Generator(
                dense_features=self.g_dense_features,
                base_features=self.g_base_features,
                convt_features=(g_convt_1, g_convt_2),
            ),
            noise_dim=self.noise_dim,
            batch_size=self.batch_size,
            client_d_steps=self.client_d_steps,
            server_g_steps=self.server_g_steps,
            client_d_learning_rate=self.client_d_learning_rate,
            server_g_learning_rate=self.server_g_learning_rate,
        )

    def fedgan_config(self) -> fedgan.FedGanConfig:
        """One GAN's federated training settings (the same for both groups)."""
        return fedgan.FedGanConfig(
            gan=self.gan_config(),
            rounds=self.rounds,
            clients_per_round=self.clients_per_round,
            sampling=self.sampling,
            l2_clip=self.l2_clip,
            noise_multiplier=self.noise_multiplier,
            adaptive_clipping=ADAPTIVE_CLIPPING if self.adaptive_clipping else None,
            delta=self.delta,
            seed=self.seed,
            secret_seed=self.secret_seed,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            audit_canaries=self.audit_canaries,
        )


@dataclasses.dataclass(frozen=True)
class FederatedImages:
    """The clients' images (with the bug), the ground truth of the bug, and healthy data
    from outside the client population the app's classifier was trained on before the bug.

    Attributes:
      healthy_source: what the healthy data is, for the summary and report.
      client_ids, classifier_writers: emnist: the clients' writers and the held-out writers
        of the healthy data (disjoint); empty for mnist5k.
    """

    clients: data_lib.FederatedData
    buggy: np.ndarray
    healthy_images: np.ndarray
    healthy_labels: np.ndarray
    num_classes: int
    healthy_source: str
    client_ids: tuple[str, ...] = ()
    classifier_writers: tuple[str, ...] = ()


def unused_flags(config: DebugConfig) -> dict[str, tuple[bool, str]]:
    """{flag: (whether `config`'s mode ignores it, why)} for the flags with a default that
    only some settings use (`cli.refuse_unused` refuses them where given and ignored)."""
    return {
        **selection.unused_flags(config),
        "emnist_classifier_writers": (
            config.dataset != "emnist",
            f"with --dataset={config.dataset} (no EMNIST writers to hold out)"),
        "num_clients": (config.dataset == "emnist",
                        "with --dataset=emnist (one client per writer)"),
    }


def split_emnist_writers(
    writers: Sequence[str], classifier_writers: int, max_clients: int | None
) -> tuple[list[str], list[str]]:
    """(the client population, the held-out writers of the app's classifier).

    The last `classifier_writers` writers in id order are held out; the clients are the
    first `max_clients` of the others (all of them for None).

    Raises:
      ConfigError: naming emnist_classifier_writers, when it leaves fewer than 2 clients or
        the population and the held-out writers do not fit in `writers`.
    """
    writers = sorted(writers)
    rest = len(writers) - classifier_writers
    require(
        rest >= 2,
        "emnist_classifier_writers",
        f"{classifier_writers} held-out writers must leave at least 2 of the file's "
        f"{len(writers)} writers as clients",
    )
    require(
        max_clients is None or max_clients <= rest,
        "emnist_classifier_writers",
        f"{classifier_writers} held-out writers and --emnist_max_clients={max_clients} clients "
        f"do not fit in the file's {len(writers)} writers: lower either",
    )
    return writers[:rest][:max_clients], writers[rest:]


def load_clients(config: DebugConfig) -> FederatedImages:
    """Federated images with the inversion bug on `bug_fraction` of the clients."""
    if config.dataset == "mnist5k":
        train = data_lib.load("mnist5k", "train")
        test = data_lib.load("mnist5k", "test")
        require(
            config.num_clients <= train.num_examples,
            "num_clients",
            f"must be <= the {train.num_examples} mnist5k training images",
        )
        parts = data_lib.partition_iid(train.num_examples, config.num_clients, config.seed)
        clients = data_lib.to_federated(train.images, train.labels, parts)
        healthy = (np.asarray(test.images), np.asarray(test.labels), train.num_classes)
        source = f"mnist5k's test split ({len(healthy[1])} images, not the clients' train split)"
        writers: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    else:
        clients, healthy, source, writers = _load_emnist(config)
    buggy_clients, buggy = bugs.inject_inversion(clients, config.bug_fraction, config.seed)
    return FederatedImages(buggy_clients, buggy, *healthy, source, *writers)


def _load_emnist(
    config: DebugConfig,
) -> tuple[data_lib.FederatedData, tuple, str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Federated EMNIST: (clients, (healthy images, labels, classes), what the healthy data
    is, (client writers, held-out writers)); the healthy data is all the held-out writers'
    examples, of both files."""
    directory = pathlib.Path(config.emnist_dir or emnist_federated.DEFAULT_DIR).expanduser()
    train_path, test_path = (
        directory / emnist_federated.FILE_NAMES[(split, False)] for split in ("train", "test")
    )
    population, held_out = split_emnist_writers(
        emnist_federated.writer_ids(train_path),
        config.emnist_classifier_writers,
        config.emnist_max_clients,
    )
    loaded = emnist_federated.load_federated_emnist(train_path, client_ids=population)
    # TFF's test file splits the same writers' examples: read only the held-out ones there.
    in_test = set(emnist_federated.writer_ids(test_path))
    files = [(train_path, held_out), (test_path, [w for w in held_out if w in in_test])]
    parts = [
        emnist_federated.load_federated_emnist(path, client_ids=ids).data
        for path, ids in files
        if ids
    ]
    healthy = (
        np.concatenate([part.images[part.mask] for part in parts]),
        np.concatenate([part.labels[part.mask] for part in parts]),
        loaded.num_classes,
    )
    source = (
        f"{len(held_out)} held-out writers, not in the client population (all "
        f"{len(healthy[1])} of their examples, train and test files)"
    )
    return loaded.data, healthy, source, (tuple(population), tuple(held_out))


def train_app_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int, seed: int
) -> tuple[nn.Module, PyTree]:
    """The app's CNN before the bug: trained (non-privately) on healthy data only."""
    model = models.get_classifier("cnn", num_classes)
    result = classifier_fit.fit(
        model,
        images,
        labels,
        seeds.root_key(seed),
        classifier_fit.FitConfig(max_epochs=epochs),
    )
    return model, result.params


def subset(fed: data_lib.FederatedData, members: np.ndarray) -> data_lib.FederatedData:
    """The clients where `members` is True."""
    return data_lib.FederatedData(
        images=fed.images[members], labels=fed.labels[members], counts=fed.counts[members]
    )


def save_grid(path: str | os.PathLike, images: np.ndarray, side: int = GRID_SIDE) -> None:
    """Writes the first side x side images (`[N, H, W, 1]` in [0, 1]) as a PNG grid.

    Tiles are separated by a 2-pixel mid-grey gap, so white backgrounds stay visible.
    """
    tiles = np.asarray(images[: side * side, ..., 0], np.float32)
    count, height, width = tiles.shape
    gap = 2
    grid = np.full((side * (height + gap) + gap, side * (width + gap) + gap), 0.5, np.float32)
    for i in range(count):
        row, col = divmod(i, side)
        top, left = gap + row * (height + gap), gap + col * (width + gap)
        grid[top : top + height, left : left + width] = tiles[i]
    pixels = (np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels, mode="L").resize(
        (grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST)
    workdir_lib.atomic_write_with(path, lambda f: image.save(f, format="PNG"))


def run(config: DebugConfig, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) the whole demo in `workdir`; returns the summary dict."""
    started = time.time()
    wd = Workdir(workdir)
    group_dirs = [f"gan_{name}" for name in GROUPS]
    selection.pin_demo_config(wd, config, group_dirs, RESUMABLE_FIELDS)
    fed = load_clients(config)
    model, params = train_app_classifier(
        fed.healthy_images,
        fed.healthy_labels,
        fed.num_classes,
        config.classifier_epochs,
        config.seed,
    )
    healthy_accuracy = classifier_fit.accuracy(
        model, params, fed.healthy_images, fed.healthy_labels
    )
    clients = fed.clients
    accuracies = selection.client_accuracies(
        functools.partial(output, model), params, clients.images, clients.labels,
        clients.counts)
    groups = selection.split_clients(
        accuracies, eligible=clients.counts > 0, **selection.split_settings(config))
    log(
        f"{selection.RAW_LOG_PREFIX}classifier: accuracy {healthy_accuracy:.3f} on its "
        f"training data; per-client accuracy thresholds low <= {groups.low_threshold:.3f}, high >= "
        f"{groups.high_threshold:.3f}: {groups.low.sum()} and {groups.high.sum()} clients"
    )
    fedgan_config = config.fedgan_config()
    sample_key = seeds.stream_key(config.seed, selection.SAMPLE_STREAM)
    results, ground_truth, audits = {}, {}, {}
    group_data = {name: subset(clients, getattr(groups, name)) for name in GROUPS}
    sizes = {name: int(group_data[name].num_clients) for name in GROUPS}
    # Both groups before either GAN trains: see pin_demo_config.
    group_sizes.require_cohorts_fit(
        config, sizes, clients.num_clients, lambda name: f"{name}-accuracy group")
    selection.pin_groups(
        wd,
        {name: params_sha256((g.images, g.labels, g.counts)) for name, g in group_data.items()},
        group_dirs,
        "dataset" if config.dataset == "mnist5k" else "emnist_dir",  # mnist5k: embedded
    )
    subpopulations, sizes_ledger = group_sizes.group_subpopulations(
        wd, config, sizes, clients.num_clients, "accuracies", log)
    for subpopulation in subpopulations.values():  # each group's divisor, before training
        if subpopulation is not None:
            config.require_noise_split(subpopulation.divisor(config.clients_per_round))
    for name in GROUPS:
        members = getattr(groups, name)
        group = group_data[name]
        summary = fedgan.train_gan(
            dataclasses.replace(fedgan_config, seed=selection.group_seed(config.seed, name),
                                subpopulation=subpopulations[name]),
            group.images,
            group.counts,
            wd.file(f"gan_{name}"),
            group=name,
            log=log,
        )
        gan_config, g_vars = fedgan.load_generator_variables(Workdir(wd.file(f"gan_{name}")))
        samples = fedgan.sample_images(gan_config, g_vars, sample_key, config.num_samples)
        save_grid(wd.file(f"samples_{name}.png"), samples)
        real = group.images[group.mask]
        # With --group_sampling=group the group sizes are released without noise, though
        # they count users whose raw accuracy passes a threshold: the group's accounting
        # needs them (q = m / N, in its ledger); guarantee_caveat says so.
        results[name] = {
            "inverted_fraction": polarity.inverted_fraction(samples),
            **group_sizes.group_size_fields(
                sizes[name], subpopulations[name], sizes_ledger, Workdir(wd.file(f"gan_{name}"))),
            **selection.model_fields(summary),
        }
        audits[f"gan_{name}"] = summary.get("audit")
        ground_truth[name] = {
            "num_clients": sizes[name],
            "buggy_client_fraction": selection.mean_or_nan(fed.buggy[members]),
            "real_inverted_fraction": selection.mean_or_nan(polarity.is_inverted(real)),
            "client_accuracy_mean": selection.mean_or_nan(accuracies[members]),
        }
    diagnostics = selection.demo_diagnostics(ground_truth, fed.buggy, groups)
    summary = {
        "method": "fedgan_debug",
        "inverted_fraction_low": results["low"]["inverted_fraction"],
        "inverted_fraction_high": results["high"]["inverted_fraction"],
        "gan_low": results["low"],
        "gan_high": results["high"],
        # On its own training data, from outside the client population (no client's data).
        "classifier_healthy_accuracy": healthy_accuracy,
        "classifier_training_data": fed.healthy_source,
        **selection.summary_fields(
            config, results, started, "accuracies", int(clients.num_clients)),
    }
    if config.audit_canaries:
        summary["audit"] = audits
        wd.write_json(AUDIT_FILE, audits)
    wd.write_json(selection.DIAGNOSTICS_JSON, diagnostics)
    wd.write_summary(summary)
    wd.write_report(render_report(config, summary, diagnostics))
    return summary


def _headline(summary: dict, found: bool, verdict: str) -> str:
    """The report's verdict; none where a GAN diverged (its NaN samples show nothing)."""
    diverged = [g for g in GROUPS if summary[f"gan_{g}"].get("diverged")]
    if diverged:
        return (f"**No verdict**: the {' and the '.join(diverged)}-accuracy GAN diverged (NaN "
                "or inf in its generator or loss; smaller learning rates?): its samples say "
                "nothing about the clients' data.")
    return f"**Bug {'found' if found else 'not found'}**: {verdict}"


def render_report(config: DebugConfig, summary: dict, diagnostics: dict) -> str:
    """report.md: both grids side by side, the inverted fractions, eps, the paper's result.

    The release sections read only `summary`; the simulation's ground truth (from
    `diagnostics`, raw client data) gets a section of its own, labelled as not a release.
    """
    low, high = summary["gan_low"], summary["gan_high"]
    found = summary["inverted_fraction_low"] > 0.5 > summary["inverted_fraction_high"]
    verdict = (
        "the low-accuracy GAN draws inverted digits (white background) and the high-accuracy "
        "GAN does not: the modeler sees what changed without looking at one real image."
        if found
        else "the two GANs do not differ in polarity."
    )
    high_inverted = f"{high['inverted_fraction']:.3f}"
    rows = selection.table_rows([
        group_sizes.size_row(config, low),
        (f"inverted fraction of {config.num_samples} GAN samples", "inverted_fraction", ".3f"),
        ("GAN wall time (s)", "wall_seconds", ".0f"),
    ], low, high)
    truth_low, truth_high = diagnostics["groups"]["low"], diagnostics["groups"]["high"]
    truth_rows = selection.table_rows([
        ("mean client accuracy", "client_accuracy_mean", ".3f"),
        ("truly buggy clients", "buggy_client_fraction", ".3f"),
        ("inverted fraction of the group's real images", "real_inverted_fraction", ".3f"),
    ], truth_low, truth_high)
    buggy_clients = f"{diagnostics['num_buggy_clients']} of the {summary['num_clients']}"
    threshold_note = (
        "A quantile threshold is a function of all clients' raw accuracies: a simulation "
        "convenience that is not a DP release; give --low_threshold/--high_threshold (as the "
        "paper did) for a pipeline where each client decides its group on its own device."
        if summary["thresholds_from_quantiles"]
        else "The thresholds were given: each client decides its group on its own device."
    )
    low_rule, high_rule = selection.threshold_rules(config, summary, "accuracy", "accuracies")
    max_eps_line = selection.max_epsilon_line(summary)
    # Each model's canary-audit line, a sub-item of its privacy line ("" without an audit).
    audits = {f"gan_{name}": selection.audit_line(summary, f"gan_{name}") for name in GROUPS}
    return f"""# Debugging private, decentralized images with DP federated GANs

Augenstein et al., "Generative Models for Effective ML on Private, Decentralized Datasets"
(ICLR 2020), image demonstration, on {config.dataset} in {summary["num_clients"]} clients;
{config.bug_fraction:.0%} of them feed **inverted** images (the simulated bug). The app's
classifier, trained before the bug on {summary["classifier_training_data"]}
(accuracy {summary["classifier_healthy_accuracy"]:.3f} on that data), is evaluated on every
client's own data; clients with {low_rule}
train one DP-FedAvg-GAN, clients with {high_rule} another.
{threshold_note}

| low-accuracy clients' GAN | high-accuracy clients' GAN |
|---|---|
| ![low](samples_low.png) | ![high](samples_high.png) |
| inverted samples: **{low["inverted_fraction"]:.3f}** | inverted samples: **{high_inverted}** |

{_headline(summary, found, verdict)}

## Numbers

| | low-accuracy group | high-accuracy group |
|---|---|---|
{rows}

Inverted fraction: a sample is inverted when the mean brightness of its 2-pixel frame is
above mid-grey (`dpfed.generative.polarity`: MNIST/EMNIST frames are background, black when
healthy; on mnist5k it separates all 5,000 digits from their inversions).

## Privacy

The unit is one **user** (client): all of a client's images may change. Only the
discriminator's clipped, noised, averaged deltas leave the clients; the generator is
trained on the server from noise and the released discriminator (post-processing).
- low-accuracy GAN: {describe_user_level_privacy(low, config.delta)}{audits["gan_low"]}
- high-accuracy GAN: {describe_user_level_privacy(high, config.delta)}{audits["gan_high"]}
- {max_eps_line}

With only a hundred-odd users, user-level eps at a noise level that still trains is large;
the accountant alone shows what the same noise and cohort size give with federated
EMNIST's 3,400 writers and with a million users (the populations the paper had in mind).

## Settings

{config.rounds} rounds, {config.clients_per_round:g} clients per round ({config.sampling},
{group_sizes.describe_group_sampling(config)}),
clip {config.l2_clip:g}{" (adaptive)" if config.adaptive_clipping else ""}, noise multiplier
{config.noise_multiplier:g}; {config.client_d_steps} client D steps (batch {config.batch_size},
SGD lr {config.client_d_learning_rate:g}), {config.server_g_steps} server G steps (SGD lr
{config.server_g_learning_rate:g}); D conv {tuple(config.d_conv_features)}, dense
{config.d_dense_features}; G dense {config.g_dense_features}, base {config.g_base_features},
convT {tuple(config.g_convt_features)}, noise dim {config.noise_dim}; seed {seeds.public(config)}.
The paper: networks D conv (64, 128), dense 1024, G dense 1024, base 256, convT (64, 32),
noise dim 128; 10 clients per round, 1000 rounds, 6 + 6 steps, lrs 5e-4 / 5e-3; federated
EMNIST (3,400 writers, 36 classes), inversion probability 0.5, groups by accuracy < 0.882
and > 0.939. Wall time of this run: {run_clock.describe(summary)}.

## What the paper showed

On federated EMNIST the GAN trained on the low-accuracy users generated inverted characters
(white background, dark strokes) while the GAN of the high-accuracy users generated normal
ones, so the modeler could see the inversion bug in the samples alone. (PAPERS.md notes the
paper's eps table could not be read: no number of theirs is quoted here.)

## Simulation ground truth and diagnostics (not a DP release)

These figures are computed from the raw client data: they are not covered by the privacy
guarantee, are written to `{selection.DIAGNOSTICS_JSON}` (each GAN's per-round cohort figures to
`gan_low/diagnostics.jsonl` and `gan_high/diagnostics.jsonl`), and must not be published
with the release. {buggy_clients} clients are truly buggy; the split used
accuracy <= {diagnostics["low_threshold"]:.3f} and >= {diagnostics["high_threshold"]:.3f}.

| | low-accuracy group | high-accuracy group |
|---|---|---|
| clients | {truth_low["num_clients"]} | {truth_high["num_clients"]} |
{truth_rows}
"""
