"""Which clients a debugging model trains on: split clients by a per-client metric.

In "Generative Models for Effective ML on Private, Decentralized Datasets" (Augenstein
et al., ICLR 2020) the deployed classifier is evaluated federatedly: each client
computes its own accuracy on device. Clients where the classifier does badly form the
"low" group, clients where it does well the "high" group (the paper: accuracy < 0.882
and > 0.939 on federated EMNIST), and one DP-FedAvg-GAN is trained per group. Each
client decides its membership from its own accuracy against *given* thresholds, so
membership needs no release to the server beyond the GAN training it then joins. How
a group's rounds sample it, and what its size then costs, is `group_sizes`'s; thresholds
taken as quantiles of all clients' values (a simulation convenience) weaken the guarantee
either way: `guarantee_caveat` says how and why.

It also holds what the two debug demos (`fedgan_debug`, `fedlm_debug`) share around
their groups: the checks of their common training settings (`check_training_settings`),
the raw-data log prefix, diagnostics.json (`demo_diagnostics`), the pins that check a
rerun once a group's sub-workdir exists (`pin_demo_config`, `pin_groups`), their
summaries' common fields (`model_fields`, `demo_fields`, `summary_fields`) and their
reports' (`threshold_rules`, `table_rows`).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpfed import privacy
from dpfed.federated import ClientData, make_example_evaluator
from dpfed.generative import group_sizes
from dpfed.privacy import audit
from dpfed.train import seeds
from dpfed.train.config import ConfigError, require
from dpfed.train.run_clock import RunClock
from dpfed.train.workdir import DIAGNOSTICS_JSON as DIAGNOSTICS_JSON  # the demos' ground truth
from dpfed.train.workdir import DIAGNOSTICS_JSON_NOTE as DIAGNOSTICS_JSON_NOTE
from dpfed.train.workdir import RAW_LOG_PREFIX as RAW_LOG_PREFIX  # raw-data terminal lines
from dpfed.train.workdir import Workdir, environment_info

DEFAULT_LOW_QUANTILE = 0.25
DEFAULT_HIGH_QUANTILE = 0.75


@dataclasses.dataclass(frozen=True)
class ClientGroups:
    """Two disjoint groups of clients.

    Attributes:
      low: bool `[clients]`, value <= `low_threshold`.
      high: bool `[clients]`, value >= `high_threshold`.
      low_threshold: the value at or below which a client is "low".
      high_threshold: the value at or above which a client is "high".
    """

    low: np.ndarray
    high: np.ndarray
    low_threshold: float
    high_threshold: float


def _split_error(side: str, given: float | None, message: str) -> ConfigError:
    """The error of a split that failed on `side`: it names that side's threshold flag if
    the threshold was given, else its quantile flag (the setting the user can change)."""
    return ConfigError(f"{side}_{'threshold' if given is not None else 'quantile'}", message)


SPLIT_SETTINGS = ("low_threshold", "high_threshold", "low_quantile", "high_quantile")


def split_settings(config: Any) -> dict[str, Any]:
    """The `split_clients` keywords a demo config holds: its fields named `SPLIT_SETTINGS`,
    and `allow_empty` with population sampling (`group_sizes`)."""
    return {**{name: getattr(config, name) for name in SPLIT_SETTINGS},
            "allow_empty": config.group_sampling == "population"}


def check_training_settings(config: Any) -> None:
    """Checks the settings of a demo config's DP-FedAvg rounds, the same in both demos:
    cohorts (`clients_per_round`, `sampling`, `group_sampling`), clip, noise and delta.

    Raises:
      ConfigError: naming the first field out of range.
    """
    require(config.clients_per_round > 0, "clients_per_round", "must be > 0")
    require(config.l2_clip > 0, "l2_clip", "must be > 0")
    require(config.noise_multiplier >= 0, "noise_multiplier", "must be >= 0")
    require(0 < config.delta < 1, "delta", "must be in (0, 1)")
    require(config.sampling in ("poisson", "fixed"), "sampling", "must be poisson or fixed")
    group_sizes.check_group_sampling(config)
    require(config.sampling == "poisson" or float(config.clients_per_round).is_integer(),
            "clients_per_round", "must be a whole number with --sampling=fixed")


def unused_flags(config: Any) -> dict[str, tuple[bool, str]]:
    """{flag: (whether a demo `config`'s mode ignores it, why)} for the split, group
    sampling and privacy flags with a default that only some settings use
    (`cli.refuse_unused` refuses them where given and ignored).

    `--delta` is the delta of the models' ledgers, kept only with noise, and of the noised
    group sizes' ledger (population sampling, written at any noise). `--l2_clip` always
    applies: each user's update is clipped at z 0 too.
    """
    return {
        "low_quantile": (config.low_threshold is not None,
                         "with --low_threshold given (it sets the low threshold)"),
        "high_quantile": (config.high_threshold is not None,
                          "with --high_threshold given (it sets the high threshold)"),
        "group_size_noise": (config.group_sampling == "group",
                             "with --group_sampling=group (no group size is noised)"),
        "delta": (config.noise_multiplier == 0 and config.group_sampling == "group",
                  "with --noise_multiplier=0 and --group_sampling=group (no noise: nothing "
                  "is accounted)"),
    }


def split_clients(
    values: np.ndarray,
    *,
    low_threshold: float | None = None,
    high_threshold: float | None = None,
    low_quantile: float = DEFAULT_LOW_QUANTILE,
    high_quantile: float = DEFAULT_HIGH_QUANTILE,
    eligible: np.ndarray | None = None,
    allow_empty: bool = False,
) -> ClientGroups:
    """Splits clients into a low and a high group by a per-client metric.

    The image demo splits by classifier accuracy, the text demo by out-of-vocabulary
    rate. A threshold that is not given is the quantile of the eligible clients' values
    (so by default the bottom and top quarters).

    Args:
      values: `[clients]` the metric of each client (e.g. its accuracy).
      low_threshold: clients with value <= this are "low" (the paper: accuracy < 0.882).
      high_threshold: clients with value >= this are "high" (the paper: accuracy > 0.939).
        Both comparisons include the threshold (as a quantile threshold must, to hold its
        boundary client), where the paper's are strict: with the paper's thresholds the
        groups differ only for a client whose accuracy equals 0.882 or 0.939 exactly.
      low_quantile: quantile giving `low_threshold` when it is None.
      high_quantile: quantile giving `high_threshold` when it is None.
      eligible: bool `[clients]`; others (e.g. clients without data) join no group, as
        does a client whose value is NaN.
      allow_empty: return an empty group instead of refusing it. With population
        sampling a refusal would be a release: it tells a population whose group has one
        user apart from the same population without that user. With both thresholds
        given this holds for a population where no client has a value too (both groups
        empty); a quantile threshold needs a value.

    Raises:
      ConfigError: on bad quantiles, thresholds with low >= high (saying whether they were
        given or quantiles), or an empty group (unless `allow_empty`); its field names the
        flag to change (`low_threshold`, `high_threshold`, `low_quantile` or
        `high_quantile`).
      ValueError: on malformed values, or no eligible client (unless `allow_empty` with
        both thresholds given).
    """
    values = np.asarray(values, np.float64)
    eligible = np.ones(values.shape, bool) if eligible is None else np.asarray(eligible, bool)
    if values.ndim != 1 or eligible.shape != values.shape:
        raise ValueError("need 1-D values and an eligible mask of the same shape")
    # A client without a value (NaN: e.g. `client_accuracies` of a client without
    # examples) is neither low nor high, whether the thresholds are given or quantiles.
    eligible = eligible & ~np.isnan(values)
    thresholds_given = low_threshold is not None and high_threshold is not None
    if not (eligible.any() or (allow_empty and thresholds_given)):
        raise ValueError("no eligible client with a value (all ineligible or NaN)")
    if not 0.0 <= low_quantile < high_quantile <= 1.0:
        raise ConfigError(
            "low_quantile",
            f"need 0 <= low_quantile < high_quantile <= 1, got {low_quantile}, {high_quantile}",
        )
    pool = values[eligible]
    low_t = float(np.quantile(pool, low_quantile)) if low_threshold is None else low_threshold
    high_t = float(np.quantile(pool, high_quantile)) if high_threshold is None else high_threshold
    if not low_t < high_t:
        if thresholds_given:
            why = "both were given: swap or change them"
        elif low_threshold is None and high_threshold is None:
            why = "both are quantiles: the clients' values are too alike to split; give thresholds"
        else:
            quantile_side = "low" if low_threshold is None else "high"
            why = (
                f"the {quantile_side} one is a quantile of the clients' values: give both "
                "thresholds or change the given one"
            )
        side = "high" if low_threshold is None and high_threshold is not None else "low"
        raise _split_error(
            side, high_threshold if side == "high" else low_threshold,
            f"low threshold {low_t:.4g} must be below high threshold {high_t:.4g} ({why})",
        )
    low = eligible & (values <= low_t)
    high = eligible & (values >= high_t)
    for name, group, given in (("low", low, low_threshold), ("high", high, high_threshold)):
        if not (group.any() or allow_empty):
            raise _split_error(
                name, given, f"the {name} group is empty (thresholds {low_t:.4g}, {high_t:.4g})")
    return ClientGroups(low=low, high=high, low_threshold=low_t, high_threshold=high_t)


def mean_or_nan(values: np.ndarray) -> float:
    """The mean of `values`; NaN for none (a group's ground truth when it is empty)."""
    return float(np.mean(values)) if np.size(values) else float("nan")


# The stream of a debug demo's seed (`seeds.stream_key`) that draws the samples of its
# released models; no other draw of the demo uses it (the groups' models train on their
# `group_seed`s, the sizes' noise is `group_sizes`' stream).
SAMPLE_STREAM = 7


def group_seed(seed: int, group: str) -> int:
    """The seed of one group's model: distinct per group, fixed by (`seed`, `group`).

    31 bits for a seed below 2**32 (as always); for a larger one, a seed in
    `seeds.SECRET_SEEDS` (`seeds.root_key` takes 64 bits; a group's config of a secret run
    takes no other, `config.require_secret_seed`), so that it is no easier to guess than
    `seed`: the first of the seed sequence's 64-bit words at or above 2**32 (the first
    word itself but once in 2**32 seeds).

    The groups' models must draw independent noise. With one seed for both, round r of
    each group adds the same Gaussian draw, and the difference of the two released
    models (same initialisation, a linear server step) holds the clipped client sums
    with no noise at all: neither group's release would then be DP given the other.
    """
    entropy = [seed, zlib.crc32(group.encode())]
    if seed < 2**32:
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0] >> 1)
    sequence, words = np.random.SeedSequence(entropy), 1
    while True:  # generate_state(n) begins with the words of generate_state(n - 1)
        word = int(sequence.generate_state(words, np.uint64)[-1])
        if seeds.is_secret(word):
            return word
        words += 1


def client_accuracies(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    images: np.ndarray | jax.Array,
    labels: np.ndarray | jax.Array,
    counts: np.ndarray | jax.Array,
) -> np.ndarray:
    """Each client's accuracy of a classifier on its own padded data (on device).

    The model runs once per real example (`dpfed.federated.make_example_evaluator`), not
    on every client's padded slots.

    Args:
      apply_fn: `apply_fn(params, images [n, ...]) -> logits [n, classes]`.
      params: the classifier's params.
      images: `[clients, max_n, ...]` padded client images.
      labels: `[clients, max_n]`.
      counts: `[clients]` real examples per client.

    Returns:
      float64 `[clients]`; a client without examples gets NaN.
    """

    def correct(params, batch):
        batch_images, batch_labels = batch
        predictions = jnp.argmax(apply_fn(params, batch_images), axis=-1)
        return {"correct": (predictions == batch_labels).astype(jnp.float32)}

    data = ClientData((np.asarray(images), np.asarray(labels)), np.asarray(counts))
    sums = make_example_evaluator(correct, data, mean=False)(params)["correct"]
    examples = np.asarray(counts, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(examples > 0, np.asarray(sums, np.float64) / examples, np.nan)


def pin_demo_config(
    workdir: Workdir, config: Any, group_dirs: Sequence[str], resumable: frozenset[str]
) -> None:
    """Pins a debug demo's config in its top-level config.json (`Workdir.pin_config`).

    A previous run released something here when a group's sub-workdir (`group_dirs`)
    exists (its checkpoints and ledger live there) or the noised group sizes do
    (`group_sizes.released_group_sizes`, which a rerun reuses): the settings must then
    match config.json (outside `resumable`). A config.json without either is a run
    stopped before any release (e.g. a cohort larger than a group): a corrected rerun is
    not refused. Sizes released but no group trained (a run refused after the release,
    e.g. a noise split that the noised sizes' divisor cannot make): the settings that only
    train the groups' models (`TRAINING_FIELDS`) may still change, so the rerun the
    refusal asks for reuses the sizes; a new workdir would release them again.
    """
    trained = _group_trained(workdir, group_dirs)
    released = trained or workdir.file(group_sizes.GROUP_SIZES_FILE).exists()
    workdir.pin_config(config, released, resumable if trained else resumable | TRAINING_FIELDS)


# Settings that the released group sizes do not depend on (`group_sizes.released_group_sizes`
# reads the groups, --group_size_noise, --seed and --delta): only the models' training.
TRAINING_FIELDS = frozenset({"noise_multiplier", "clients_per_round"})


def _group_trained(workdir: Workdir, group_dirs: Sequence[str]) -> bool:
    """Whether a previous run trained a group's model here (its sub-workdir exists)."""
    return any(workdir.file(name).exists() for name in group_dirs)


GROUPS_FILE = "groups.json"  # a digest of each group's training data; not a release


def pin_groups(
    workdir: Workdir, digests: dict[str, str], group_dirs: Sequence[str], flag: str
) -> None:
    """Pins each group's data digest (`params_sha256` of its training data) in groups.json;
    a resume on other data is refused.

    The config pin cannot see a change of the data themselves (other files under a
    resumable path, or a recomputed grouping: the app's classifier is retrained on every
    run, and quantile thresholds move with it), which would continue a group's model and
    ledger on other users.

    Raises:
      ConfigError: naming `flag`, when a group's sub-workdir exists and its digest differs
        from the pinned one; naming "workdir", when groups.json is then unreadable
        (`Workdir.read_pin`). A workdir without groups.json (older runs) is pinned as is.
    """
    pinned = workdir.read_pin(GROUPS_FILE, resuming=_group_trained(workdir, group_dirs))
    if pinned is not None:
        changed = sorted(name for name, d in digests.items() if pinned.get(name) != d)
        if changed:
            raise ConfigError(
                flag,
                f"the {' and '.join(changed)} group's training data differ from those of the "
                f"run being resumed in {workdir.path}: restore that data or use a new workdir",
            )
    workdir.write_json(GROUPS_FILE, digests)


def threshold_rule(
    side: str, given: float | None, quantile: float, metric: str, metrics: str
) -> str:
    """How the `side` ("low"/"high") group is chosen, from the settings alone (a quantile's
    value is raw data): e.g. "accuracy <= 0.882" or "accuracy <= the 0.25 quantile of all
    clients' accuracies" (`metric` and its plural `metrics` name the per-client value)."""
    op = "<=" if side == "low" else ">="
    if given is not None:
        return f"{metric} {op} {given:.3f}"
    return f"{metric} {op} the {quantile:g} quantile of all clients' {metrics}"


def threshold_rules(config: Any, summary: dict, metric: str, metrics: str) -> tuple[str, str]:
    """The low and the high group's `threshold_rule`, from a demo's settings: the thresholds
    its summary gives (None for a quantile) and its config's quantiles."""
    low, high = (
        threshold_rule(side, summary[f"{side}_threshold"], getattr(config, f"{side}_quantile"),
                       metric, metrics)
        for side in ("low", "high"))
    return low, high


def max_epsilon(results: dict[str, dict]) -> float | None:
    """The eps of releasing every group's model: the groups are disjoint, so the max of
    the groups' eps, each with the group sizes' release where they were noised (given
    the grouping and, with "group" sampling, the sizes: `guarantee_caveat`)."""
    eps = [r.get("epsilon_rdp_with_group_sizes", r["epsilon_rdp"]) for r in results.values()]
    return None if any(e is None for e in eps) else max(eps)


def eps_headline(summary: dict) -> str:
    """The binaries' last words on privacy: the groups' max eps and what it assumes."""
    eps = summary["epsilon_rdp"]
    if eps is None:
        return "non-private"
    if summary["guarantee_caveat"] is None:
        return (f"user-level eps {privacy.format_upper(eps, 3)} (RDP, the groups' max with "
                "their noised sizes, end to end)")
    given = ("given their sizes" if summary["flags"]["group_sampling"] == "group"
             else "given the grouping")
    return (f"user-level eps {privacy.format_upper(eps, 3)} (RDP, the groups' max {given}: "
            "see the caveat in report.md)")


def table_rows(rows: Sequence[tuple[str, str, str]], left: dict, right: dict) -> str:
    """The body of a report's table of two groups: `| label | left | right |` for each
    (label, key, format spec) row, where left and right are the groups' `key` in `spec`."""
    return "\n".join(f"| {label} | {format(left[key], spec)} | {format(right[key], spec)} |"
                     for label, key, spec in rows)


def audit_line(summary: dict, model: str) -> str:
    """report.md's canary-audit line of one group's `model` (its key in the demo's
    summary.json `audit`, e.g. "gan_low"), as a sub-item to append to that model's privacy
    line; "" in a run without an audit (`dpfed.privacy.audit`)."""
    line = audit.report_line({"audit": (summary.get("audit") or {}).get(model)})
    return f"\n  {line.rstrip()}" if line else ""


def max_epsilon_line(summary: dict) -> str:
    """The report's line on the eps of releasing both groups' models and its caveat."""
    line = (f"the groups are disjoint, so releasing both costs the larger eps: "
            f"{privacy.format_upper(summary['epsilon_rdp'], 3)}")
    if summary["guarantee_caveat"] is None:
        return (line + " (with the noised group sizes' release). **End to end**: given "
                "thresholds, Poisson cohorts of the whole population and noised group sizes, "
                "this eps holds for each user with nothing taken as given but the public "
                "number of users N (q = m / N) and a secret seed (WORKSPACE.md, \"The "
                "workdir contract\").")
    return line + f". **Caveat**: {summary['guarantee_caveat']}"


def guarantee_caveat(
    low_threshold: float | None, high_threshold: float | None, sampling: str, metric: str,
    group_sampling: str = "group",
) -> str | None:
    """Why the groups' eps (and their max) is not an end-to-end guarantee; None if it is.

    With `group_sampling` "group", always some reason: each group's size counts the users
    whose raw value passes a threshold, and it is released without noise (summary, report,
    the ledger's population N and sampling rate q = m / N, which the DP-FedAvg accounting
    needs). So each group's eps holds for each user given the group sizes. With
    "population" the sizes are noised and accounted for. Then the max of the groups' eps
    holds when adding or removing one user changes at most one group's data by that one
    user (parallel composition; the groups draw independent noise), which further needs
    - given thresholds: each client's group is a function of its own data. A quantile
      threshold is a function of all clients' values, so one user moves it and can move
      other users (many, when values tie) across groups;
    - Poisson sampling, analysed under add/remove-one. A fixed-size cohort is analysed
      under replace-one with a fixed population, but replacing a user can take it out of
      one group and put its replacement into the other: both groups' data change, each by
      a removal or an addition, which that analysis does not cover.

    Args:
      low_threshold, high_threshold: the thresholds given as flags; None for a quantile.
      sampling: the cohorts' sampling, "poisson" or "fixed".
      metric: the per-client values the groups are split by, for the message.
      group_sampling: "group" or "population" (`GROUP_SAMPLING`).
    """
    if group_sampling == "group":
        caveat = (
            f"Each group's size (its clients and sampling rate) counts the users whose raw "
            f"{metric} pass a threshold and is released without noise, so the groups' eps, and "
            "their max, hold for each user given the group sizes, not end to end "
            "(--group_sampling=population noises the sizes and accounts for them)"
        )
        given = ". Even given the group sizes, the max holds only per group, given the grouping: "
    else:
        caveat = ("The groups' sizes are noised and accounted for, but the max of the groups' "
                  "eps holds only per group, given the grouping")
        given = ": "
    reasons = []
    if low_threshold is None or high_threshold is None:
        reasons.append(
            f"the thresholds are quantiles of all clients' raw {metric}, so one user can "
            "move other users across groups (give --low_threshold and --high_threshold)"
        )
    if sampling != "poisson":
        reasons.append(
            f"with --sampling={sampling} the guarantee is under replace-one, but a replaced "
            "user can leave one group while its replacement joins the other, so both groups' "
            "data change, each by a removal or an addition that this analysis does not "
            "cover (use --sampling=poisson)"
        )
    if reasons:
        caveat += given + "; and ".join(reasons)
    elif group_sampling != "group":
        return None
    return caveat + "."


# What a demo's summary.json keeps of each of its models' summary.json.
MODEL_SUMMARY_KEYS = (
    "seed",  # its own: the groups draw independent noise
    "epsilon_rdp", "epsilon_pld", "epsilon_rdp_same_noise_if_users", "rounds",
    "wall_seconds", "wall_seconds_earlier", "diverged", "sampling_rate",
)


def model_fields(model_summary: dict) -> dict:
    """The `MODEL_SUMMARY_KEYS` of one model's summary, for the demo's summary."""
    return {key: model_summary[key] for key in MODEL_SUMMARY_KEYS}


def demo_fields(results: dict[str, dict], started: float) -> dict:
    """The demo summary's fields over both models (`results`, each with `model_fields`):
    `diverged` if either did, and the wall time of this invocation (`started`) plus what
    the models' checkpoints kept of earlier ones."""
    earlier = sum(r["wall_seconds_earlier"] for r in results.values())
    return {"diverged": any(r["diverged"] for r in results.values()),
            **RunClock(started, earlier).summary()}


def summary_fields(
    config: Any, results: dict[str, dict], started: float, metrics: str, num_clients: int
) -> dict:
    """The fields both demos' summary.json hold besides their own measurements.

    The eps of releasing both models (`max_epsilon`) and why it is not end to end
    (`guarantee_caveat`, on the groups' per-client `metrics`); the split's settings (a
    threshold from a quantile is None here: it is raw data, in diagnostics.json); the
    population's `num_clients`; `demo_fields`; the config and the environment.

    Args:
      config: the demo's config.
      results: each group's release fields, with `model_fields`.
      started: when this invocation started (`time.time()`).
      metrics: the per-client values the groups are split by, e.g. "accuracies".
      num_clients: the client population's size.
    """
    thresholds_given = config.low_threshold is not None and config.high_threshold is not None
    return {
        "epsilon_rdp": max_epsilon(results),
        "guarantee_caveat": guarantee_caveat(
            config.low_threshold, config.high_threshold, config.sampling, metrics,
            config.group_sampling),
        "delta": config.delta if config.noise_multiplier > 0 else None,
        "unit": "user",
        "low_threshold": config.low_threshold,
        "high_threshold": config.high_threshold,
        "thresholds_from_quantiles": not thresholds_given,
        "num_clients": num_clients,
        **demo_fields(results, started),
        **seeds.summary_fields(config),
        "environment": environment_info(),
    }


def demo_diagnostics(
    ground_truth: dict[str, dict], buggy: np.ndarray, groups: ClientGroups, **figures: Any
) -> dict:
    """A demo's diagnostics.json (`DIAGNOSTICS_JSON`; raw data, not a release): each
    group's `ground_truth`, how many clients are truly `buggy`, the demo's other raw
    `figures`, and the thresholds the split used (a quantile one is a function of all
    clients' values)."""
    return {
        "note": DIAGNOSTICS_JSON_NOTE,
        "groups": ground_truth,
        "num_buggy_clients": int(buggy.sum()),
        **figures,
        "low_threshold": groups.low_threshold,
        "high_threshold": groups.high_threshold,
    }
