"""Privacy accounting on dp_accounting: DpEvents for DP-SGD-style mechanisms, eps, calibration.

Conventions (dp_accounting's): a `GaussianDpEvent`'s noise multiplier is the noise
std divided by the L2 sensitivity *under the neighbouring relation in use*.
- Poisson sampling is analysed under add/remove-one: a clipped sum with clip C has
  sensitivity C, so std = z*C is `GaussianDpEvent(z)`.
- Fixed-size sampling without replacement is analysed under replace-one: the same
  clipped sum has sensitivity 2C, so std = z*C is `GaussianDpEvent(z / 2)`. Passing z
  there would under-count the privacy loss by a factor of about 4 in RDP.
"""

import decimal
import enum
import logging
import math
import numbers
from collections.abc import Callable, Iterator
from typing import overload

import attr
import dp_accounting
import numpy as np
from dp_accounting import NeighboringRelation, dp_event, pld, rdp
from dp_accounting.dp_event import DpEvent


def _drop_excluded_order_warnings(record: logging.LogRecord) -> bool:
    """False for dp_accounting's "failed to converge ... Excluding this order" lines.

    The RDP accountant then leaves that order out of the minimum over orders, so eps
    stays a valid upper bound (possibly a looser one); the line, logged at every call,
    only buries the progress output.
    """
    return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


logging.getLogger("absl").addFilter(_drop_excluded_order_warnings)


class Sampling(enum.StrEnum):
    """How a batch (of examples, or a cohort of clients) is drawn each step."""

    POISSON = "poisson"  # each record independently with probability q; add/remove-one
    FIXED = "fixed"  # a uniformly random subset of fixed size without replacement; replace-one


def relation_for(sampling: Sampling | str) -> NeighboringRelation:
    """The neighbouring relation under which `sampling` is analysed."""
    if Sampling(sampling) is Sampling.POISSON:
        return NeighboringRelation.ADD_OR_REMOVE_ONE
    return NeighboringRelation.REPLACE_ONE


def sampled_gaussian_event(
    inner: DpEvent,
    *,
    sampling: Sampling | str,
    population: int,
    expected_size: float,
) -> DpEvent:
    """Wraps one release `inner` (a Gaussian event of a clipped sum) in its sampling.

    Args:
      inner: the event of the noised release computed on the sample, expressed with
        add/remove-one sensitivity (std / C).
      sampling: Poisson (probability expected_size / population) or fixed size.
      population: number of records (examples, clients) sampled from.
      expected_size: expected sample size (Poisson) or exact sample size (fixed).
    """
    if not (0 < population < math.inf and 0 < expected_size <= population):
        raise ValueError(
            f"need 0 < expected_size <= population < inf, got {expected_size} and {population}"
        )
    if not is_whole_number(population):
        raise ValueError(f"population must be a whole number of records, got {population}")
    if Sampling(sampling) is Sampling.POISSON:
        return dp_event.PoissonSampledDpEvent(expected_size / population, inner)
    if not is_whole_number(expected_size):
        raise ValueError(f"fixed-size sampling needs an integer size, got {expected_size}")
    return dp_event.SampledWithoutReplacementDpEvent(
        population, int(expected_size), _to_replace_one(inner)
    )


def _to_replace_one(event: DpEvent) -> DpEvent:
    """Halves Gaussian noise multipliers: replace-one doubles a clipped sum's sensitivity."""
    return _scale_gaussians(event, 0.5)


def _scale_gaussians(event: DpEvent, factor: float) -> DpEvent:
    """`event` with every Gaussian noise multiplier times `factor` (other events refused)."""

    def scale(leaf: DpEvent) -> DpEvent:
        if isinstance(leaf, dp_event.GaussianDpEvent):
            return dp_event.GaussianDpEvent(leaf.noise_multiplier * factor)
        raise ValueError(f"cannot rescale the noise of {type(leaf).__name__}")

    return _map_events(event, scale)


def _map_events(
    event: DpEvent,
    leaf: Callable[[DpEvent], DpEvent],
    composed: Callable[[list[DpEvent]], DpEvent] = dp_event.ComposedDpEvent,
) -> DpEvent:
    """`event` rebuilt with `leaf` applied to each event that holds no other, and
    `composed` building each composition from its rebuilt members."""
    if isinstance(event, dp_event.ComposedDpEvent):
        return composed([_map_events(e, leaf, composed) for e in event.events])
    if isinstance(event, dp_event.SelfComposedDpEvent):
        return dp_event.SelfComposedDpEvent(_map_events(event.event, leaf, composed), event.count)
    if isinstance(event, dp_event.PoissonSampledDpEvent):
        return dp_event.PoissonSampledDpEvent(
            event.sampling_probability, _map_events(event.event, leaf, composed)
        )
    if isinstance(event, dp_event.SampledWithoutReplacementDpEvent):
        return dp_event.SampledWithoutReplacementDpEvent(
            event.source_dataset_size, event.sample_size, _map_events(event.event, leaf, composed)
        )
    return leaf(event)


def dpsgd_event(
    noise_multiplier: float,
    steps: int,
    *,
    sampling: Sampling | str,
    population: int,
    expected_size: float,
) -> DpEvent:
    """`steps` DP-SGD steps: a sampled Gaussian on a clipped sum, std = z * C."""
    step = sampled_gaussian_event(
        dp_event.GaussianDpEvent(noise_multiplier),
        sampling=sampling,
        population=population,
        expected_size=expected_size,
    )
    return dp_event.SelfComposedDpEvent(step, steps)


def epsilon(
    event: DpEvent,
    delta: float,
    relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
    accountant: str = "rdp",
) -> float | None:
    """eps of `event` at `delta` by the RDP or the PLD accountant.

    Returns None when that accountant does not support the event under `relation`
    (e.g. PLD and sampling without replacement).

    dp_accounting's two accountants read a Gaussian's multiplier differently under
    replace-one: RDP against the sensitivity under that relation (this module's
    convention), PLD against the add/remove-one sensitivity, which it doubles. The PLD
    path therefore gets doubled multipliers under replace-one, so that both accountants
    analyse the same mechanism (before 2026-12-01, DataLens's balanced partitions reported
    a PLD eps of 22.6 for a mechanism of PLD eps 9.3). The PLD grid's spacing is
    `pld_interval` of the event's RDP eps.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    check_event(event)
    if accountant == "rdp":
        return _rdp_epsilon_of(event, delta, relation)
    acct = make_accountant(accountant, relation)  # raises for an unknown accountant
    pld_event = event
    if relation == NeighboringRelation.REPLACE_ONE:
        try:
            pld_event = _scale_gaussians(event, 2.0)
        except ValueError:
            return None
    pld_event = merge_gaussians(pld_event)
    if not acct.supports(pld_event):
        return None  # before the RDP eps of the grid (~0.6 s for sampling w/o replacement)
    grid = pld_interval(epsilon(event, delta, relation))
    key = (repr(pld_event), delta, relation, grid)
    if key not in _PLD_EPS_OF:
        acct = make_accountant("pld", relation, grid)
        acct.compose(pld_event)
        _PLD_EPS_OF[key] = _checked_eps(float(acct.get_epsilon(delta)), "pld", pld_event)
    return _PLD_EPS_OF[key]


def _checked_eps(eps: float, accountant: str, event: DpEvent) -> float:
    """`eps`, unless it is NaN (an accountant's failure, never an upper bound)."""
    if math.isnan(eps):
        raise ValueError(f"the {accountant} accountant returned eps NaN for {event}")
    return eps


class _Memo(dict):
    """A dict that forgets its oldest entries beyond `size` (what `epsilon` has computed)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        while len(self) > self.size:
            del self[next(iter(self))]


# A ledger's eps is asked for again and again as its events repeat: at each evaluation, in
# ledger.json, in each checkpoint, in each budget check. The RDP of one sampled Gaussian
# over dp_accounting's orders took ~0.5 s of the slow CPU, most of a 100-round logreg
# FedAvg run, so each kind of event's RDP is computed once (keyed by its `repr`, which
# names every parameter, floats by their shortest exact repr), and the PLD eps of a
# composition once.
_RDP_OF = _Memo(4096)
_PLD_EPS_OF = _Memo(256)


def _rdp_epsilon_of(
    event: DpEvent, delta: float, relation: NeighboringRelation
) -> float | None:
    """RDP eps of `event` at `delta`, as dp_accounting's `RdpAccountant.compose(event)`
    then `get_epsilon(delta)` give it, to the bit: the accountant adds `count x` the RDP
    curve of each event below the compositions (`ComposedDpEvent`, `SelfComposedDpEvent`)
    in the same order, and each curve is computed by the accountant itself, once
    (`_RDP_OF`). None when the accountant does not support `event` under `relation`."""
    orders = make_accountant("rdp", relation).orders
    total = np.zeros_like(orders, dtype=np.float64)
    for leaf, count in _leaves(event, 1):
        key = (repr(leaf), relation)
        if key not in _RDP_OF:
            acct = make_accountant("rdp", relation)
            supported = acct.supports(leaf)
            if supported:
                acct.compose(leaf)
            _RDP_OF[key] = acct.rdp if supported else None
        curve = _RDP_OF[key]
        if curve is None:
            return None
        total += count * curve
    eps = float(rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])
    return _checked_eps(eps, "rdp", event)


def _leaves(event: DpEvent, count: int) -> Iterator[tuple[DpEvent, int]]:
    """(event, repetitions) of each event below `event`'s compositions, in the order
    dp_accounting's RDP accountant visits them."""
    if isinstance(event, dp_event.SelfComposedDpEvent):
        yield from _leaves(event.event, event.count * count)
    elif isinstance(event, dp_event.ComposedDpEvent):
        for member in event.events:
            yield from _leaves(member, count)
    else:
        yield event, count


def rdp_epsilon(
    event: DpEvent,
    delta: float,
    relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
) -> float:
    """RDP eps of `event` at `delta` (`epsilon` with the RDP accountant, never None).

    Raises:
      ValueError: the RDP accountant does not support `event` under `relation` (e.g.
        sampling without replacement under add/remove-one).
    """
    eps = epsilon(event, delta, relation, "rdp")
    if eps is None:
        raise ValueError(
            f"{event} is not supported under {relation.name.lower()} by the RDP accountant")
    return eps


def warn_if_delta_too_large(delta: float, population: int, unit: str) -> bool:
    """Logs a warning when `delta` >= 1/`population`; returns whether it warned.

    Such a delta admits a mechanism that releases one `unit`'s data in the clear (of a
    population of `population` units), so the guarantee says little.
    """
    if delta < 1.0 / population:
        return False
    logging.warning(
        "delta=%g >= 1/N=%g (N=%d %ss): such a delta allows releasing one %s in the clear",
        delta, 1.0 / population, population, unit, unit)
    return True


def is_whole_number(value: object) -> bool:
    """True for an int or a finite float of integral value (not a bool, NaN or inf),
    Python's or numpy's; a Python bool in every case (numpy's `==` gives numpy's)."""
    return bool(
        isinstance(value, numbers.Real) and not isinstance(value, bool)
        and math.isfinite(value)
        # typeshed's numbers.Real is not SupportsInt, though every Real converts (numpy's
        # ints have no __trunc__, so math.trunc would not do).
        and int(value) == value  # type: ignore[call-overload]
    )


def check_event(event: DpEvent) -> None:
    """Raises ValueError unless every parameter of `event`, at any depth, is a number the
    accountants read correctly: no NaN anywhere, and whole counts and sizes.

    dp_accounting accepts a NaN noise multiplier, and its RDP accountant then reports eps
    0 for the whole composition, every other event included.
    """
    for field in attr.fields(type(event)):
        value = getattr(event, field.name)
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{type(event).__name__}.{field.name} is NaN: {event}")
    if isinstance(event, dp_event.SelfComposedDpEvent) and not (
            is_whole_number(event.count) and event.count >= 1):
        raise ValueError(f"a self-composition needs a whole count >= 1: {event}")
    if isinstance(event, dp_event.PoissonSampledDpEvent) and not (
            0 <= event.sampling_probability <= 1):
        raise ValueError(f"sampling probability must be in [0, 1]: {event}")
    if isinstance(event, dp_event.SampledWithoutReplacementDpEvent) and not (
            is_whole_number(event.source_dataset_size) and is_whole_number(event.sample_size)):
        raise ValueError(f"dataset and sample sizes must be whole numbers: {event}")
    inner = event.events if isinstance(event, dp_event.ComposedDpEvent) else [
        getattr(event, "event", None)]
    for member in inner:
        if isinstance(member, DpEvent):
            check_event(member)


def merge_gaussians(event: DpEvent) -> DpEvent:
    """`event` with every composition of Gaussian events replaced by one Gaussian.

    Gaussian mechanisms with multipliers z_1..z_k released together are exactly one
    Gaussian mechanism of multiplier (sum_i z_i^-2)^-1/2: scaled to unit noise, their joint
    sensitivity is sqrt(sum_i z_i^-2), and the privacy-loss distributions of Gaussians
    compose exactly. Inside a sampled event both queries see the same sample, so the same
    holds there (adaptive clipping's sum and count queries). dp_accounting's PLD
    accountant takes only a plain Gaussian inside a Poisson-sampled event; this rewrite
    lets it account such rounds. The RDP of the result is also unchanged (tested).
    """
    return _map_events(event, lambda leaf: leaf, _merge_composed)


def _merge_composed(events: list[DpEvent]) -> DpEvent:
    """One Gaussian for a composition of Gaussians; any other composition as it is."""
    if events and all(isinstance(e, dp_event.GaussianDpEvent) for e in events):
        if any(e.noise_multiplier == 0 for e in events):
            return dp_event.GaussianDpEvent(0.0)
        return dp_event.GaussianDpEvent(math.fsum(e.noise_multiplier**-2 for e in events) ** -0.5)
    return dp_event.ComposedDpEvent(events)


PLD_INTERVAL = 1e-4  # dp_accounting's default spacing of the privacy loss grid
PLD_FINE_UP_TO_EPS = 100.0  # RDP eps up to which the PLD grid is PLD_INTERVAL


def pld_interval(rdp_eps: float | None) -> float:
    """The PLD grid's spacing for an event of RDP eps `rdp_eps`: `PLD_INTERVAL` up to
    eps `PLD_FINE_UP_TO_EPS`, beyond it `PLD_INTERVAL` times `rdp_eps / PLD_FINE_UP_TO_EPS`.

    The grid spans the privacy loss's range, which grows with eps: at 1e-4, two DP-SGD
    steps (q = 16/1438) took 30 s of PLD at z = 0.1 and more than 34 GiB at z = 0.02,
    which ended a run with a large `--target_epsilon` after its training. The PLD
    accountant's pessimistic discretisation rounds each loss up at any spacing, so the
    eps stays an upper bound, but a looser one the more events are composed (each is
    rounded on the coarser grid): a grid of 1e-4 x eps put 1,000,000 x Poisson(0.01,
    Gaussian(1.1)) 16% above the 1e-4 grid's eps (a review), hence the fine grid up to
    eps 100. None or an infinite eps (RDP cannot say): `PLD_INTERVAL`.
    """
    if rdp_eps is None or not math.isfinite(rdp_eps):
        return PLD_INTERVAL
    return PLD_INTERVAL * max(1.0, rdp_eps / PLD_FINE_UP_TO_EPS)


def make_accountant(
    accountant: str, relation: NeighboringRelation, pld_grid: float = PLD_INTERVAL,
) -> dp_accounting.PrivacyAccountant:
    """A fresh dp_accounting accountant ("rdp" or "pld", on a grid of `pld_grid`)."""
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    if accountant == "pld":
        return pld.PLDAccountant(relation, pld_grid)
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")


class CalibrationError(ValueError):
    """The target (eps, delta) cannot be met within the allowed noise range."""


def calibrate_noise_multiplier(
    make_event: Callable[[float], DpEvent],
    target_epsilon: float,
    delta: float,
    relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
    max_noise_multiplier: float = 1000.0,
) -> float:
    """Smallest noise multiplier z whose event `make_event(z)` has RDP eps <= target.

    Uses `dp_accounting.calibrate_dp_mechanism`; the answer errs on the safe side
    (slightly more noise than the exact solution).

    Raises:
      CalibrationError: the target is not finite and positive, or out of reach.
      ValueError: the RDP accountant does not support the events under `relation`.
    """
    if not 0 < target_epsilon < math.inf or not 0 < delta < 1:
        raise CalibrationError(
            f"need a finite eps > 0 and 0 < delta < 1, got {target_epsilon}, {delta}")
    if rdp_epsilon(make_event(max_noise_multiplier), delta, relation) > target_epsilon:
        raise CalibrationError(
            f"eps={target_epsilon} at delta={delta} is out of reach even with noise "
            f"multiplier {max_noise_multiplier}"
        )
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: rdp.RdpAccountant(neighboring_relation=relation),
        make_event,
        target_epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    if rdp_epsilon(make_event(z), delta, relation) > target_epsilon:  # defensive; never loosen
        raise CalibrationError(f"calibration returned z={z} above the target eps")
    return float(z)


def gaussian_sigma_for_sum(noise_multiplier: float, l2_clip: float) -> float:
    """Noise std for a clipped sum: z * C (add/remove-one sensitivity C)."""
    # `not 0 < C < inf` also refuses NaN; an infinite C would clip nothing and noise inf.
    if noise_multiplier < 0 or not 0 < l2_clip < math.inf or not math.isfinite(noise_multiplier):
        raise ValueError(f"need z >= 0 and 0 < C < inf, got z={noise_multiplier}, C={l2_clip}")
    return noise_multiplier * l2_clip


@overload
def format_upper(value: float | None, digits: int = 4, missing: str = "n/a") -> str: ...
@overload
def format_upper(value: float | None, digits: int, missing: None) -> str | None: ...
@overload
def format_upper(value: float | None, digits: int = 4, *, missing: None) -> str | None: ...
def format_upper(
    value: float | None, digits: int = 4, missing: str | None = "n/a"
) -> str | None:
    """`value` to `digits` significant digits rounded UP: the text never reads below it.

    For quoting eps and delta, which a reader must not understate: 4.22434 reads 4.225,
    not 4.224. None or NaN gives `missing` (None leaves a progress field out).
    """
    if value is None or math.isnan(value):
        return missing
    if math.isinf(value):
        return f"{value:g}"
    # From the shortest decimal that reads back as `value` (1e-05, not the binary float's
    # 1.00000000000000008e-05, which would round up to 1.01e-05).
    ceiling = decimal.Context(prec=digits, rounding=decimal.ROUND_CEILING).create_decimal(
        repr(float(value))
    )
    return f"{float(ceiling):.{digits}g}"
