"""How a debug demo's groups are sampled, and what their sizes cost in privacy.

The two debug demos (`fedgan_debug`, `fedlm_debug`; Augenstein et al., ICLR 2020) train
one model per group of users chosen by a per-client value (`selection`). How each
group's rounds sample it (`--group_sampling`):
- "group" (the paper's reading): each round samples the group at q = m / N_group. The
  accounting needs N_group, a count of users whose raw value passes a threshold, so each
  group's size is released without noise and eps holds given the group sizes.
- "population": each round Poisson-samples the whole population at q = m / N (public);
  sampled users outside the group sit the round out (they decide on device), so the
  accounting needs q alone (`dpfed.federated.Subpopulation`). The mean divides by q times
  the group's size plus Gaussian noise (`noisy_group_sizes`), a release of its own with
  its own ledger (`group_sizes_ledger`), composed with each group's model's
  (`end_to_end_epsilon`). With given thresholds nothing is then taken as given
  (`selection.guarantee_caveat`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from absl import flags
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.federated import Subpopulation
from dpfed.train import seeds
from dpfed.train.config import ConfigError, require
from dpfed.train.workdir import LEDGER_FILE, Workdir

# How a group's rounds sample: its own members at m / N_group, or all users at m / N.
GROUP_SAMPLING = ("group", "population")
DEFAULT_GROUP_SIZE_NOISE = 10.0  # std of the noise on each group's size (users)
GROUP_SIZES_FILE = "group_sizes.json"  # the noised sizes (a release)
GROUP_SIZES_LEDGER = "group_sizes_ledger.json"  # their privacy cost
_GROUP_SIZES_KEY = 0x5A5E  # folded into the seed for the sizes' noise

# `define_group_sampling_flags`' flags are the calling binary's key flags: its --help
# lists them with its own.
flags.disclaim_key_flags()


def noisy_group_sizes(sizes: dict[str, int], stddev: float, seed: int) -> dict[str, int]:
    """Each group's size plus independent N(0, stddev^2), rounded to whole users and
    floored at 1 (both post-processing).

    The Gaussian mechanism on the vector of group sizes: when each user's group is a
    function of its own data (given thresholds), adding or removing one user changes one
    size by 1, an L2 sensitivity of 1, so `group_sizes_ledger(stddev, ...)` accounts for
    it. Deterministic in `seed` (`released_group_sizes` keeps the first draw).

    The rounding is what keeps the release private in floating point: the noise is a
    float32 draw, and an unrounded n + stddev * e gave n away (for the true n alone is
    (v - n) / stddev a float32 that the sampler can return; found by an audit on
    2026-12-05, which decoded the demo's released 122.61361... as 116 users).
    """
    if not stddev > 0:
        raise ValueError(f"the group sizes' noise must be > 0, got {stddev}")
    key = seeds.stream_key(seed, _GROUP_SIZES_KEY)
    noise = np.asarray(privacy.standard_normal(key, (len(sizes),)), np.float64)
    return {name: max(1, round(n + stddev * e))
            for (name, n), e in zip(sizes.items(), noise, strict=True)}


def group_sizes_ledger(stddev: float, delta: float, metric: str) -> privacy.PrivacyLedger:
    """The ledger of `noisy_group_sizes`' one release (unit user, add/remove-one)."""
    ledger = privacy.PrivacyLedger(
        unit="user", neighboring_relation="add_or_remove_one", delta=delta, metadata={
            "mechanism": f"Gaussian noise on each group's size (the users whose own {metric} "
                         "pass a threshold), L2 sensitivity 1 with given thresholds",
            "noise_multiplier": stddev,
        })
    ledger.record(dp_event.GaussianDpEvent(stddev))
    return ledger


def released_group_sizes(
    workdir: Workdir, sizes: dict[str, int], stddev: float, seed: int, delta: float, metric: str,
) -> tuple[dict[str, int], privacy.PrivacyLedger]:
    """The noised group sizes released in `workdir` and their ledger: those of
    group_sizes.json where an earlier run wrote it, else drawn and written now (the
    ledger first: a kill between the writes leaves no release outside a ledger).

    A rerun never draws again: a second draw is a second release the ledger does not
    count (with another JAX PRNG implementation, say, or, with the same noise at another
    `stddev`, two values that give the true sizes away). The settings it was drawn with
    are pinned by `selection.pin_demo_config`.

    Raises:
      ConfigError: group_sizes.json holds other groups or another noise std (a config
        pin the caller skipped); its ledger is left as it was, counting that release.
    """
    ledger = group_sizes_ledger(stddev, delta, metric)
    noisy = _earlier_release(workdir, sizes, stddev)  # checked before the ledger is written
    workdir.write_json(GROUP_SIZES_LEDGER, ledger.to_json())
    if noisy is None:  # drawn once, after its ledger is on disk
        noisy = noisy_group_sizes(sizes, stddev, seed)
        workdir.write_json(GROUP_SIZES_FILE, {"noised_sizes": noisy, "noise_stddev": stddev})
    return noisy, ledger


def _earlier_release(
    workdir: Workdir, sizes: dict[str, int], stddev: float
) -> dict[str, int] | None:
    """The noised sizes of `sizes`' groups in `workdir`'s group_sizes.json, None where no
    run released them; a ConfigError where it holds other groups or another std."""
    if not workdir.file(GROUP_SIZES_FILE).exists():
        return None
    released = workdir.read_json_object(GROUP_SIZES_FILE)
    noisy = released.get("noised_sizes", {})
    if set(noisy) != set(sizes) or released.get("noise_stddev") != stddev:
        raise ConfigError(
            "group_size_noise",
            f"{workdir.file(GROUP_SIZES_FILE)} holds sizes released with std "
            f"{released.get('noise_stddev')} for groups {sorted(noisy)}, not {stddev} for "
            f"{sorted(sizes)}: use the settings it was drawn with or a new workdir")
    return {name: noisy[name] for name in sizes}


def end_to_end_epsilon(
    sizes_ledger: privacy.PrivacyLedger, model_workdir: Workdir, accountants=("rdp",)
) -> dict[str, float | None]:
    """eps by each of `accountants` of the group sizes' release composed with one group's
    model's ledger.json, read once (None for a non-private model, or an accountant that
    does not support them)."""
    path = model_workdir.file(LEDGER_FILE)
    model = (privacy.PrivacyLedger.from_json(model_workdir.read_json_object(LEDGER_FILE))
             if path.exists() else None)
    if model is None or not model.entries:
        return dict.fromkeys(accountants)
    composed = sizes_ledger.with_recorded(model.composed_event())
    return {accountant: composed.epsilon(accountant) for accountant in accountants}


def define_group_sampling_flags(defaults: Any) -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """The debug binaries' --group_sampling and --group_size_noise (`defaults`: a config)."""
    return (
        flags.DEFINE_enum(
            "group_sampling", defaults.group_sampling, list(GROUP_SAMPLING),
            "group: rounds sample a group at m / its size (released); population: at m / all "
            "users, a group's users taking part (its size noised: end to end with given "
            "thresholds)."),
        flags.DEFINE_float("group_size_noise", defaults.group_size_noise,
                           "population: std of the noise on each group's size (users)."),
    )


def check_group_sampling(config: Any) -> None:
    """Checks a demo config's `group_sampling` and `group_size_noise` (ConfigError)."""
    require(config.group_sampling in GROUP_SAMPLING, "group_sampling",
            f"must be one of {GROUP_SAMPLING}")
    if config.group_sampling == "population":
        require(config.sampling == "poisson", "sampling",
                "must be poisson with --group_sampling=population: a fixed cohort of the "
                "population holds a random number of a group's members")
        require(config.group_size_noise > 0, "group_size_noise",
                "must be > 0: the noise on the group sizes is what makes them private")


def require_cohorts_fit(
    config: Any, sizes: dict[str, int], population: int, describe: Callable[[str], str]
) -> None:
    """Refuses, before any model trains, cohorts the groups cannot hold.

    `config` has `clients_per_round` and `group_sampling`; `sizes` are the groups' true
    sizes, `population` all clients, and `describe(name)` names a group in a message
    (e.g. "low-accuracy group"). With "group" sampling each group must hold the expected
    cohort; with "population" the population must (`split_clients` refuses empty groups).
    """
    if config.group_sampling == "group":
        for name, size in sizes.items():
            require(config.clients_per_round <= size, "clients_per_round",
                    f"must be <= the {size} clients of the {describe(name)}")
        return
    require(config.clients_per_round <= population, "clients_per_round",
            f"must be <= the {population} clients of the population")


def group_subpopulations(
    workdir: Workdir, config: Any, sizes: dict[str, int], population: int, metric: str,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Subpopulation | None], privacy.PrivacyLedger | None]:
    """Each group's `Subpopulation` and the noised sizes' ledger (`released_group_sizes`)
    with `config.group_sampling` "population"; Nones with "group". Logs a warning for a
    noised size under `SMALL_GROUP_STDS` noise stds (`small_group_warning`)."""
    if config.group_sampling == "group":
        return dict.fromkeys(sizes), None
    noisy, ledger = released_group_sizes(
        workdir, sizes, config.group_size_noise, config.seed, config.delta, metric)
    for name, size in noisy.items():
        warning = small_group_warning(name, size, config.group_size_noise)
        if warning:
            log(warning)
    return {name: Subpopulation(population, noisy[name]) for name in sizes}, ledger


SMALL_GROUP_STDS = 3  # a noised size under this many noise stds gets a warning


def small_group_warning(name: str, noised_size: float, stddev: float) -> str | None:
    """A warning when a group's noised size is under `SMALL_GROUP_STDS` noise stds: its
    rounds' mean divides by q x that size, perhaps far from q x the true size (floored at
    1, a small group's divisor can be several times too small). A function of the release
    alone."""
    if noised_size >= SMALL_GROUP_STDS * stddev:
        return None
    return (f"warning: the {name} group's noised size, {noised_size:g} users, is under "
            f"{SMALL_GROUP_STDS} x --group_size_noise ({SMALL_GROUP_STDS * stddev:g}): its "
            f"mean update divides by q x {noised_size:g}, which may be far from q x its true "
            "size; a larger population or a smaller --group_size_noise helps")


def group_size_fields(
    size: int, subpopulation: Subpopulation | None, sizes_ledger: privacy.PrivacyLedger | None,
    model_workdir: Workdir,
) -> dict:
    """A group's release fields on its size: the true `size` with "group" sampling (it
    is released, see `guarantee_caveat`); with a subpopulation its noised size, the
    population, and the model's eps composed with the sizes' release."""
    if subpopulation is None:
        return {"num_clients": size}
    assert sizes_ledger is not None  # both or neither (`group_subpopulations`)
    return {
        "num_clients_noised": subpopulation.members_estimate,
        "population": subpopulation.population,
        **{f"epsilon_{a}_with_group_sizes": eps for a, eps in
           end_to_end_epsilon(sizes_ledger, model_workdir, ("rdp", "pld")).items()},
    }


def size_row(config: Any, release: dict) -> tuple[str, str, str]:
    """A report table's row of a group's size, as (label, key, format spec): the true size
    released with "group" sampling, else the noised one (`group_size_fields`)."""
    if "num_clients" in release:
        return ("clients", "num_clients", "d")
    return (f"clients (size + N(0, {config.group_size_noise:g}^2), rounded)", "num_clients_noised",
            "g")


def describe_group_sampling(config: Any) -> str:
    """How a demo's groups were sampled, for its report's settings."""
    if config.group_sampling == "group":
        return "each group sampled on its own (--group_sampling=group)"
    return ("each round samples the whole population, a group's users taking part "
            f"(--group_sampling=population, group sizes noised with std "
            f"{config.group_size_noise:g})")
