"""The canary audit of a DataLens run (`--audit_canaries`): canary teachers in vote space.

DataLens releases noisy vote sums, not a model update, so its canaries live in the space
of one step's vote sum (`[batch_size, D]` flattened), not in the generator's parameters,
and the audit reads every step's release (`audit.observe`, audit.json's `all_rounds`);
there is no final-model attack.

A canary is a canary teacher's vote difference at the mechanism's full sensitivity. The
ledger's neighbouring relation lets one teacher's vote change arbitrarily: votes c and -c
of k non-zeros +-1 differ by 2c, of norm 2 sqrt(k) = sqrt(4k) (`TopAgg.sensitivity`).
An inserted canary adds w u_c to the vote sum before `TopAgg.privatize`, u_c a unit
direction, w its weight below: the sum's sensitivity to it is exactly the ledger's ("c
against -c" differs from "2c against nothing" only by a public offset). A held-out canary
is never added. Every step (all teachers vote every step: rate 1).

Scopes (`DataLensConfig.vote_scope`):
- "batch": one aggregation of the B*D coordinates a step. A direction has k coordinates
  (one in each of k equal blocks, `audit.draw`), values +-1/sqrt(k), weight w = 2 sqrt(k):
  w u_c is exactly a legal vote's 2c. Its score s = <noisy sum, u_c> / w moves by 1 when
  the canary is in the sum and carries the noise sigma / w = z, the ledger's multiplier
  sigma / sqrt(4k).
- "sample": B aggregations of D coordinates a step, each its own Gaussian event of
  multiplier z. A canary may move each row (aggregation) by at most sqrt(4k): a
  direction has k coordinates in every row, values +-1/sqrt(kB) (`audit.draw` with
  `rows` = B), weight w = 2 sqrt(kB), so each row gets +-2 on k coordinates, norm 2
  sqrt(k) exactly. Its score s = <noisy sum, u_c> / w moves by 1 and carries the noise
  sigma / w = z / sqrt(B). And B Gaussian mechanisms of multiplier z, each of
  sensitivity 1 in its own row, released together, are exactly one Gaussian mechanism
  of multiplier z / sqrt(B) (the rows' noise is independent: the joint privacy loss is
  the sum of B Gaussian losses of mean 1/(2 z^2) and variance 1/z^2 each, i.e. that of
  a Gaussian of multiplier z / sqrt(B)). So a step is observed with noise multiplier z /
  sqrt(B), and the all-rounds family, `steps` x Gaussian(z / sqrt(B)) at rate 1, is the
  ledger's own mechanism, `steps` x B events of z.

Directions anew every step. The candidates' coins (inserted or held out) are drawn once
from the run's seed (`audit.fair_coins` of the audit stream); each step draws every
candidate's direction afresh from that step's key (`fold_in(key, audit.STEP_KEY)`). A
fixed direction would be summed coherently over the steps with the other canaries'
(their overlaps, ~k / (B D) each, are large in a vote space of a few thousand
coordinates) and with the real votes' steady part (teachers keep pushing the same
pixels): over thousands of steps those grow as `steps` while the noise grows as
sqrt(steps), and would drown the shift. Fresh directions turn both into zero-mean noise
of each step. A canary whose vote changes from step to step is still one teacher's vote
(real teachers' do too), so the sensitivity and the one-run bounds' premises (an
independent fair coin per candidate, the mechanism DP towards each) are unchanged.

The noise key is the run's: an audit run adds its canaries to the same vote sum and
noises it with the same key as the run without them; the sums of s (`audit.RoundScores`)
are the state's "audit" entry, checkpointed with it. The generator trains on the
canaries' aggregates: an audit run's generator is not for release.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpfed.generative.datalens.topagg import TopAgg
from dpfed.privacy import audit
from dpfed.train import seeds


class VoteCanaries(NamedTuple):
    """The candidates of an audit run (a jit argument: `DataLens.train_step`).

    Attributes:
      inserted: bool [2K]: candidate i is inserted (its own fair coin, `audit.fair_coins`).
    """

    inserted: jax.Array

    @property
    def candidates(self) -> int:
        """2K, the number of candidates."""
        return self.inserted.shape[0]

    @property
    def counts(self) -> tuple[int, int]:
        """(inserted, held out): how many candidates each set has."""
        inserted = int(np.sum(np.asarray(self.inserted)))
        return inserted, self.candidates - inserted


def draw(audit_canaries: int, seed: int) -> VoteCanaries | None:
    """The candidates of a run with `audit_canaries` = K (2K fair coins from `seed`'s audit
    stream); None without an audit (K = 0)."""
    if not audit_canaries:
        return None
    key = seeds.stream_key(seed, seeds.AUDIT_STREAM)
    return VoteCanaries(jnp.asarray(audit.fair_coins(key, audit_canaries)))


def rows(vote_scope: str, batch_size: int) -> int:
    """The aggregations of one step, the rows of a canary's direction: B, or 1."""
    return batch_size if vote_scope == "sample" else 1


def weight(topagg: TopAgg, num_rows: int) -> float:
    """w = 2 sqrt(k `num_rows`): an inserted canary adds w u_c, 2 sqrt(k) in each row."""
    return topagg.sensitivity * math.sqrt(num_rows)


def noise_multiplier(topagg: TopAgg, num_rows: int) -> float:
    """The noise std of a step's score s: z / sqrt(`num_rows`), z = sigma / sqrt(4k)."""
    return topagg.noise_multiplier / math.sqrt(num_rows)


def directions(key: jax.Array, count: int, shape: tuple[int, ...], topagg: TopAgg,
               num_rows: int) -> audit.Canaries:
    """One step's directions of `count` candidates in the flattened vote sum of `shape`
    ([B, D]): k coordinates in each of `num_rows` rows (`audit.draw`)."""
    space = jax.ShapeDtypeStruct((math.prod(shape),), jnp.float32)
    return audit.draw(key, space, count, support=topagg.k, rows=num_rows)


def insert(canaries: VoteCanaries, step_directions: audit.Canaries, vote_sum: jax.Array,
           topagg: TopAgg, num_rows: int) -> jax.Array:
    """`vote_sum` plus w u_c for each inserted candidate (`weight`; held-out ones add 0)."""
    weights = weight(topagg, num_rows) * canaries.inserted.astype(jnp.float32)
    # Rate 1: every candidate is present, whatever the (unused) sampling key draws.
    return audit.insert(step_directions, vote_sum, weights, 1.0, jax.random.key(0))


def observe(sums: audit.RoundScores, step_directions: audit.Canaries, noisy_sum: jax.Array,
            topagg: TopAgg, num_rows: int) -> audit.RoundScores:
    """`sums` plus one step's s = <`noisy_sum`, u_c> / w of every candidate
    (`audit.observe` at rate 1): +1 for an inserted one, noise std `noise_multiplier`."""
    return audit.observe(sums, step_directions, noisy_sum,
                         jnp.float32(weight(topagg, num_rows)), 1.0, 1.0,
                         noise_multiplier(topagg, num_rows))


def all_steps_audit(
    sums: audit.RoundScores, canaries: VoteCanaries, steps: int, topagg: TopAgg,
    num_rows: int,
) -> Callable[[float], dict[str, Any]]:
    """`audit.all_rounds` at a delta of `steps` steps' `sums`, the inserted candidates
    first: `steps` Gaussians of multiplier `noise_multiplier` at rate 1."""
    order = np.argsort(~np.asarray(canaries.inserted), kind="stable")  # the inserted first
    ordered = audit.RoundScores(*(jnp.asarray(np.asarray(x)[order]) for x in sums))
    return functools.partial(audit.all_rounds, ordered, canaries.counts[0], steps, 1.0,
                             noise_multiplier(topagg, num_rows))
