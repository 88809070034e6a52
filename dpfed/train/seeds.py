"""A run's root key from its seed, and the secret seed that its releases never show.

Every DP release draws its noise from `root_key(seed)`. JAX's own `jax.random.key(seed)`
takes 32 bits, and 2**32 seeds are not a secret: an attacker holding a released model
update can try every one, regenerate the noise (threefry is counter-based: a few
coordinates suffice), recognise the right seed (the difference is then a clipped sum of
bounded norm, not noise of norm ~ z C sqrt(d)) and subtract the noise. A secret seed
(`--secret_seed`) is therefore drawn from 64 bits of OS entropy (`draw_secret`), kept in
the workdir's `secret_seed.json` (never to be shared: `Workdir.pin_seed`), and every file
a run writes besides shows the string "secret" in its place (`public`, `public_fields`).
"""

import dataclasses
import secrets
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SEED_BITS = 64  # root_key takes seeds in [0, 2**64)
SECRET = "secret"  # what config.json and the releases say in place of a secret seed
SECRET_SEED_FILE = "secret_seed.json"  # in the workdir; never share it
SECRET_SEED_NOTE = (
    "Never share this file: anyone holding this seed can regenerate and subtract the DP "
    "noise of every release of this run. It is not a release; keep it to resume the run."
)
# config.json's copy of secret_seed.json's "nonce" (`draw_nonce`): a resume refuses a
# secret_seed.json whose nonce is not the one its workdir's run pinned (`Workdir.pin_seed`).
NONCE_FIELD = "secret_seed_nonce"
# A secret seed has 64 bits, none below 2**32: a seed derived from it for a sub-model
# (`selection.group_seed`) is then derived with 64 bits too, not 31.
SECRET_SEEDS = range(2**32, 2**SEED_BITS)
# Streams of a run's root key (`stream_key`) far above any step or round index folded
# into the same key: its initial model, and its released synthetic samples.
INIT_STREAM = 2**31 - 1
SAMPLE_STREAM = 2**31 - 2
AUDIT_STREAM = 2**31 - 5  # the canary directions of an audit run (`dpfed.privacy.audit`)


def root_key(seed: int) -> jax.Array:
    """The threefry key of `seed` in [0, 2**64): key data [seed >> 32, seed & 0xFFFFFFFF].

    For every seed below 2**32 it is `jax.random.key(seed)`, bit for bit, so runs seeded
    before 64-bit seeds existed draw the same numbers; `jax.random.key` of a larger seed
    keeps only its low 32 bits (2**32 + 5 would be seed 5).

    Raises:
      ValueError: `seed` is not an integer in [0, 2**64).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"a seed must be an integer, not {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**SEED_BITS:
        raise ValueError(f"a seed must be in [0, 2**{SEED_BITS}), not {seed}")
    data = np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(data))


def stream_key(seed: int, stream: int) -> jax.Array:
    """The key of one stream of a run's randomness (its initial model, its evaluation
    samples, a round's keys: `stream` a constant of the module that draws it):
    `jax.random.fold_in(root_key(seed), stream)`.

    Raises:
      ValueError: as `root_key`.
    """
    return jax.random.fold_in(root_key(seed), stream)


def draw_secret() -> int:
    """A fresh secret seed in `SECRET_SEEDS`, from the OS's entropy (`secrets`)."""
    return SECRET_SEEDS.start + secrets.randbelow(SECRET_SEEDS.stop - SECRET_SEEDS.start)


def draw_nonce() -> str:
    """A fresh nonce for a run's secret_seed.json: 128 bits from the OS's entropy, drawn
    apart from the seed, so that it tells nothing of it and may be public (config.json).

    It names the run whose secret the file holds: a secret_seed.json copied from another
    workdir has another nonce than the config.json of the run it would continue. A digest
    of the seed would not do: anyone could find the seed by hashing each of the 2**64.
    """
    return secrets.token_hex(16)


def is_secret(seed: object) -> bool:
    """Whether `seed` may be a secret seed: an integer (Python or numpy; not a bool) in
    `SECRET_SEEDS`. A smaller one is found by trying them all, whatever a run claims."""
    return (not isinstance(seed, bool) and isinstance(seed, int | np.integer)
            and int(seed) in SECRET_SEEDS)  # int(): `in range` iterates over anything else


def public(config: Any) -> int | str:
    """The seed as a release may show it: `config.seed`, or `SECRET` where
    `config.secret_seed` (a run's config dataclass)."""
    return SECRET if config.secret_seed else config.seed


# Config fields added after config.json existed, with their defaults: left out at those,
# so a run that does not use them pins the config.json it pinned before they existed.
LATER_FIELDS = {"secret_seed": False, "audit_canaries": 0}


def public_fields(fields: dict) -> dict:
    """A config's fields (`dataclasses.asdict`) as config.json and summaries show them.

    With `secret_seed` the seed is `SECRET`. A field of `LATER_FIELDS` at its default
    (no `--secret_seed`, no audit) is left out, so a run's config.json and summary are
    what they were before the flag existed, and workdirs of earlier versions resume under
    an unchanged config.
    """
    kept = {name: value for name, value in fields.items()
            if name not in LATER_FIELDS or value != LATER_FIELDS[name]}
    return {**kept, "seed": SECRET} if fields.get("secret_seed") else kept


def public_config(config: Any) -> dict:
    """A run's config dataclass as config.json and its summary's `flags` show it
    (`public_fields` of its fields)."""
    return public_fields(dataclasses.asdict(config))


def summary_fields(config: Any) -> dict:
    """A trainer summary's `flags` and `seed` of its `config`, as a release shows them."""
    return {"flags": public_config(config), "seed": public(config)}


def evaluation_seed(config: Any) -> int:
    """The seed of the evaluation a binary runs on its released generator (`--evaluate`):
    `config.seed`, or 0 for a secret seed. The evaluation only post-processes the release,
    so its draws need no secret, and eval.json, a release, records its seed."""
    return 0 if config.secret_seed else config.seed


def read_secret(stored: dict) -> int:
    """The seed of a parsed secret_seed.json.

    Raises:
      ValueError: it holds no seed in `SECRET_SEEDS`.
    """
    seed = stored.get("seed")
    if not (isinstance(seed, int) and is_secret(seed)):
        raise ValueError(f"no seed in [2**32, 2**{SEED_BITS})")
    return seed


def read_nonce(stored: dict) -> str | None:
    """The nonce of a parsed secret_seed.json (`draw_nonce`); None in one written before
    nonces existed.

    Raises:
      ValueError: its nonce is not a string of hex digits.
    """
    nonce = stored.get("nonce")
    if nonce is not None and not (isinstance(nonce, str) and nonce
                                  and all(c in "0123456789abcdef" for c in nonce)):
        raise ValueError("its nonce is not a string of hex digits")
    return nonce
