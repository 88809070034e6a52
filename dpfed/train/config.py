"""Config validation shared by the trainers: a bad field raises ConfigError naming it.

Binaries turn a ConfigError into `cli.FlagError(error.field, error.message)`: exit code 2
and one line naming the flag.
"""

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Protocol

import jax
import numpy as np

from dpfed.data import registry
from dpfed.privacy import audit
from dpfed.train import seeds


class DataclassInstance(Protocol):
    """An instance of a dataclass (what `dataclasses.fields` takes)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


class ConfigError(ValueError):
    """A config field has a value the run cannot use; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def require(condition: bool, field: str, message: str) -> None:
    """Raises ConfigError(field, message) unless `condition` holds."""
    if not condition:
        raise ConfigError(field, message)


def require_no_privacy_settings(
    nonprivate: bool, mode: str, noise_multiplier: float | None, target_epsilon: float | None
) -> None:
    """Refuses a noise multiplier or an eps target in a non-private run.

    Both ask for a guarantee that a non-private run (`mode`, e.g. "--nodp") does not give;
    ignoring them silently would report "non-private" for a run its user meant to be DP.

    Raises:
      ConfigError: naming the first of the two that is set.
    """
    settings = {"noise_multiplier": noise_multiplier, "target_epsilon": target_epsilon}
    for field, value in settings.items():
        require(not (nonprivate and value is not None), field,
                f"does not apply to a non-private run ({mode}): drop one of the two")


def require_audit_count(audit_canaries: int) -> None:
    """Refuses a canary audit (`--audit_canaries`) of fewer than `audit.MIN_CANARIES`
    canaries (0: no audit).

    Raises:
      ConfigError: naming "audit_canaries".
    """
    require(audit_canaries == 0 or audit_canaries >= audit.MIN_CANARIES, "audit_canaries",
            f"must be 0 (no audit) or >= {audit.MIN_CANARIES}")


def require_audit_applies(
    audit_canaries: int, nodp: bool, sampling: str, mode: str = "--nodp"
) -> None:
    """Refuses a canary audit (`--audit_canaries`, `dpfed.privacy.audit`) that cannot run:
    fewer than `audit.MIN_CANARIES` canaries, a non-private run (`nodp`; `mode` names its
    flag, e.g. "--noise_multiplier=0"), or sampling other than Poisson (a canary is sampled
    as a record of Poisson sampling).

    Raises:
      ConfigError: naming "audit_canaries".
    """
    require_audit_count(audit_canaries)
    require(not (audit_canaries and nodp), "audit_canaries",
            f"audits the privacy of a private run: it does not apply with {mode}")
    require(not (audit_canaries and sampling != "poisson"), "audit_canaries",
            "canaries are sampled as records of Poisson sampling: use --sampling=poisson")


def unused_privacy_flags(
    nonprivate: bool, mode: str, names: tuple[str, ...] = ("l2_clip", "delta")
) -> dict[str, tuple[bool, str]]:
    """The entries of a `cli.refuse_unused` table for the privacy flags with a default
    (`names`) that a non-private run (`mode`, e.g. "--nodp") ignores: the twin, for flags
    the run sees only as values, of `require_no_privacy_settings`."""
    return dict.fromkeys(
        names, (nonprivate, f"with {mode} (nothing is clipped, noised or accounted)"))


def require_data_dir_applies(dataset: str, data_dir: str | None) -> None:
    """Refuses a `data_dir` for an embedded dataset, whose arrays ship with dpfed:
    `dpfed.data.load` ignores the folder, so a user who meant a copy of their own in it
    would train on the embedded one (config.json recording the folder) without a word.

    Raises:
      ConfigError: on field "data_dir".
    """
    require(data_dir is None or registry.source_flag(dataset) == "data_dir", "data_dir",
            f"has no effect with --dataset={dataset}, an embedded dataset (its arrays "
            "ship with dpfed): drop it")


def require_finite_floats(config: DataclassInstance) -> None:
    """Raises ConfigError for a float field of the dataclass `config` (a Python, numpy or
    0-d jax float, or one inside a tuple or list field) that is inf or nan.

    No setting of ours means either, and a config built in a notebook skips the binaries'
    flag check (`cli`): a learning rate of inf trains on NaN, a clip norm of inf bounds no
    sensitivity, a nan noise multiplier compares False with everything and so slips past
    each `>= 0` check. Call it first in `__post_init__`.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        for item in value if isinstance(value, tuple | list) else (value,):
            require(not _is_float(item) or math.isfinite(item), field.name,
                    f"must be a finite number, not {item}")


def require_secret_seed(config: Any) -> None:
    """Refuses a config whose `secret_seed` claims a seed that is no secret: one outside
    `seeds.SECRET_SEEDS` (a 32-bit seed, say 0, is found by trying them all).

    The binaries draw a secret seed (`Workdir.pin_seed`); a config built in a notebook
    skips them, and its releases would say "secret" over a guessable seed. Call it in the
    `__post_init__` of every config with the fields `seed` and `secret_seed`.

    Raises:
      ConfigError: on field "secret_seed". The message does not show the seed.
    """
    require(not config.secret_seed or seeds.is_secret(config.seed), "secret_seed",
            "needs a seed in [2**32, 2**64) drawn from the OS's entropy (seeds.draw_secret, "
            "as Workdir.pin_seed draws and keeps it in secret_seed.json); this seed is none: "
            "its releases would say 'secret' over a seed anyone can find")


def _is_float(value: object) -> bool:
    """A Python or numpy float, or a 0-d float array (numpy or jax); not an int or a bool,
    which are always finite."""
    if isinstance(value, numbers.Integral):
        return False
    if isinstance(value, numbers.Real):
        return True
    return (isinstance(value, np.ndarray | jax.Array) and value.ndim == 0
            and np.issubdtype(value.dtype, np.floating))
