"""The DP-FedAvg engine: one jitted, pure round with user-level DP.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models"), optionally with adaptive clipping (Andrew et al. 2021). One round:
1. sample a cohort inside jit (Poisson with rate q, or m clients without replacement);
2. every sampled client runs its client update from the broadcast shared parameters
   (`local.local_training`: a `lax.scan` of local optimiser steps); update = local - global;
3. clip each update to flat L2 norm C, zero non-finite ones, *sum*;
4. add N(0, (zC)^2) and divide by the *expected* cohort size (q N, or m);
5. the server optimiser (optax: SGD, momentum, Adam) takes minus that mean as its gradient;
6. with adaptive clipping, C follows the noised unclipped fraction.
An audit run also adds canary clients to the sum of step 3 (`audit`: Andrew et al. 2024)
and, given the held-out directions too, accumulates each round's projections of the mean
of step 4 on all of them in the state (the all-rounds audit).

Execution: the cohort is processed in chunks of `chunk_size` clients by a `lax.while_loop`
(ceil(count / chunk_size) passes: an overflowing Poisson cohort is never truncated, see
`sampling`). Each chunk is split over the `clients` axis of a device mesh with
`jax.shard_map`; on each device its clients run `clients_per_device_step` at a time under
`jax.vmap`, the groups one after another under `lax.scan`, and the per-device sums meet in
one `psum`. Client c of a round always uses the key `fold_in(round_key, c)`, so the result
does not depend on the chunking, the vmap width or the number of devices (up to the order
of float summation).

The server state is a pytree of arrays; the round is `round(state, key) -> (state,
metrics)`. Keys come from the caller (the host loop uses `fold_in(seed_key, round)`).
The metrics come in two parts (`RoundMetrics`): `released` holds what derives from DP
releases alone (`clip_norm`, `noised_unclipped_fraction`); `diagnostics` holds the
*non-private simulation diagnostics* computed from the raw cohort (its size, client losses,
update norms, the raw unclipped fraction): useful for debugging, not covered by the
guarantee, and written by the host loop to `diagnostics.jsonl`, never to the release files.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from dp_accounting import dp_event
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpfed import privacy
from dpfed.federated import sampling as sampling_lib
from dpfed.federated.aggregation import AdaptiveClipping, PrivateAggregator, clip_update
from dpfed.federated.client_data import (
    ClientData,
    OneClient,
    check_client_data,
    gather_clients,
)
from dpfed.federated.local import ClientOutput
from dpfed.federated.mesh import CLIENTS, client_mesh, replicate
from dpfed.privacy import audit
from dpfed.train.config import require_finite_floats

PyTree = Any
# client_update(shared_params, client_state, client, context, key) -> ClientOutput.
ClientUpdateFn = Callable[[PyTree, PyTree, OneClient, PyTree, jax.Array], ClientOutput]


class ServerState(NamedTuple):
    """Everything a round reads and writes (no PRNG state: keys are passed in).

    Attributes:
      params: the shared (broadcast and privately aggregated) parameters.
      opt_state: the server optimiser's state.
      round: rounds done (int32).
      clip_norm: the clip norm C of the next round (float32; inf when unclipped).
      client_states: per-client state with a leading [num_clients] axis kept on device
        (e.g. a client's own encoder); `()` when clients keep nothing.
      context: read-only payload broadcast with the params that clients do not update
        (e.g. a GAN's generator, trained by the server); `()` when unused.
      audit: an all-rounds audit run's `audit.RoundScores` of the inserted, then the
        held-out canaries (`DpFedAvg(..., held_out=...)`); `()` otherwise.
    """

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    clip_norm: jax.Array
    client_states: PyTree
    context: PyTree
    audit: PyTree = ()


def checkpoint_layout(state: ServerState) -> ServerState | dict[str, Any]:
    """What a checkpoint holds of `state`: all of it in an all-rounds audit run, else the
    fields `ServerState` had before `audit` (stop 59), by name, so that such checkpoints
    keep their layout and those written before `audit` existed still resume (orbax
    records every field by name, even an empty one)."""
    if len(state.audit):
        return state
    return {name: getattr(state, name) for name in ServerState._fields if name != "audit"}


def from_checkpoint_layout(saved: ServerState | dict[str, Any]) -> ServerState:
    """The `ServerState` of a checkpoint's layout (`checkpoint_layout`)."""
    return saved if isinstance(saved, ServerState) else ServerState(**saved)


@dataclasses.dataclass(frozen=True)
class DpFedAvgConfig:
    """How rounds sample, clip, noise and execute.

    Attributes:
      clients_per_round: expected cohort size (Poisson) or exact cohort size (fixed).
      sampling: "poisson" (rate clients_per_round / num_clients) or "fixed".
      l2_clip: per-client clip norm C (the initial C with adaptive clipping); None means
        no clipping (non-private FedAvg; needs noise_multiplier 0).
      noise_multiplier: z, total noise std / C of a round (0: no noise, no DP).
      adaptive_clipping: quantile-tracking clip norm (Andrew et al. 2021), or None.
      chunk_size: clients per pass of the round's loop (a multiple of devices x
        clients_per_device_step); None: `CohortSampler.default_chunk_size`.
      clients_per_device_step: clients trained at once per device under vmap; None: 1 on
        CPU (XLA:CPU runs vmapped per-client convolutions as slow grouped convolutions)
        and the device's whole share of a chunk on accelerators.
      subpopulation: the clients are the users of a larger population that take part
        (`sampling.Subpopulation`; Poisson only): q = clients_per_round / its population,
        and the mean divides by q x its `members_estimate`. None: the clients are all.
    """

    clients_per_round: float
    sampling: str = "poisson"
    l2_clip: float | None = 1.0
    noise_multiplier: float = 0.0
    adaptive_clipping: AdaptiveClipping | None = None
    chunk_size: int | None = None
    clients_per_device_step: int | None = None
    subpopulation: sampling_lib.Subpopulation | None = None

    def __post_init__(self):
        require_finite_floats(self)
        if self.l2_clip is not None and not self.l2_clip > 0:
            raise ValueError(f"l2_clip must be > 0, got {self.l2_clip}")
        if self.l2_clip is None and (self.noise_multiplier > 0 or self.adaptive_clipping):
            raise ValueError("noise and adaptive clipping need an l2_clip")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.clients_per_device_step is not None and self.clients_per_device_step < 1:
            raise ValueError(
                f"clients_per_device_step must be >= 1, got {self.clients_per_device_step}")


class RoundMetrics(NamedTuple):
    """A round's figures, split by what the privacy guarantee covers.

    Attributes:
      released: functions of the round's DP releases (and public values) only.
      diagnostics: functions of the raw cohort (sizes, losses, norms): not a release.
    """

    released: dict[str, jax.Array]
    diagnostics: dict[str, jax.Array]


class _Sums(NamedTuple):
    """Masked sums over clients; `below` is sum(1{||d|| <= C} - 1/2) (the count query)."""

    delta: PyTree
    below: jax.Array
    nonfinite: jax.Array
    clients: jax.Array
    norm: jax.Array
    metrics: dict[str, jax.Array]


def _tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.add, a, b)


class DpFedAvg:
    """DP-FedAvg over the clients of `data` (any model, any client update).

    Args:
      client_update: `(shared, client_state, OneClient, context, key) -> ClientOutput`,
        e.g. `local.local_training(...)`; it decides which parameters are shared (those
        it returns in `ClientOutput.params`) and which stay on the client (its state).
      server_optimizer: optax transformation applied to minus the averaged update
        (`optax.sgd(1.0)` is plain FedAvg).
      data: the clients' padded data; copied to every device of `mesh`.
      config: sampling, clipping, noise and execution settings.
      mesh: a mesh with a `clients` axis (default: all devices).
      canaries: for an audit run only (`audit`): directions in the shared parameters'
        space, each a canary client sampled like a user (Poisson only) that adds C times
        its direction to the clipped sum. Its model is not for release.
      held_out: with `canaries`, the audit's held-out directions (never inserted): each
        round then also adds the standardised projections of its release, the noised
        mean, on the inserted and the held-out directions to `ServerState.audit`
        (`audit.observe`; the all-rounds audit). Needs noise.
    """

    def __init__(
        self,
        client_update: ClientUpdateFn,
        server_optimizer: optax.GradientTransformation,
        data: ClientData,
        config: DpFedAvgConfig,
        mesh: Mesh | None = None,
        canaries: audit.Canaries | None = None,
        held_out: audit.Canaries | None = None,
    ):
        check_client_data(data)
        if canaries is not None and (
                config.sampling != "poisson" or config.l2_clip is None):
            raise ValueError("canaries take part as users of Poisson sampling and send an "
                             "update of norm C: they need sampling='poisson' and an l2_clip")
        if held_out is not None and (canaries is None or not config.noise_multiplier > 0):
            raise ValueError("the all-rounds audit (held_out) needs inserted canaries and "
                             "noise: its scores are in units of the noise")
        self.config = config
        self.mesh = client_mesh() if mesh is None else mesh
        self.client_update = client_update
        self.server_optimizer = server_optimizer
        self.num_clients = data.num_clients
        self.sampler = sampling_lib.CohortSampler(
            config.sampling, data.num_clients, config.clients_per_round, config.subpopulation)
        self.aggregator = PrivateAggregator(
            config.noise_multiplier, self.sampler.divisor, config.adaptive_clipping)
        devices = self.mesh.shape[CLIENTS]
        width = config.clients_per_device_step
        if width is None and jax.default_backend() == "cpu":
            width = 1
        self.chunk_size = config.chunk_size or self.sampler.default_chunk_size(
            devices * (width or 1))
        if self.chunk_size % (devices * (width or 1)):
            raise ValueError(
                f"chunk_size {self.chunk_size} must be a multiple of {devices} devices x "
                f"{width or 1} clients per device step")
        self.clients_per_device_step = width or self.chunk_size // devices
        self.data = replicate(_at_least_one_client(data), self.mesh)
        self.canaries = None if canaries is None else replicate(canaries, self.mesh)
        # The directions whose projections each round accumulates: inserted, then held out.
        self.observed = None if held_out is None or canaries is None else replicate(
            audit.concat(canaries, held_out), self.mesh)
        self._round = jax.jit(self._round_impl)
        self._round_donating = jax.jit(self._round_impl, donate_argnums=0)

    def init(self, params: PyTree, client_states: PyTree = (), context: PyTree = ()) -> ServerState:
        """The round-0 state, replicated over the mesh.

        `client_states` leaves need a leading [num_clients] axis (`local.init_local_states`).
        """
        for leaf in jax.tree_util.tree_leaves(client_states):
            if self.num_clients == 0:
                raise ValueError("an engine without clients keeps no client states")
            if leaf.shape[:1] != (self.num_clients,):
                raise ValueError(
                    f"client_states leaves need a leading axis of {self.num_clients} clients, "
                    f"got shape {leaf.shape}")
        if self.canaries is not None:
            audit.check_fits(self.canaries if self.observed is None else self.observed, params)
        clip = self.config.l2_clip if self.config.l2_clip is not None else jnp.inf
        state = ServerState(
            params=params,
            opt_state=self.server_optimizer.init(params),
            round=jnp.int32(0),
            clip_norm=jnp.float32(clip),
            client_states=client_states,
            context=context,
            audit=() if self.observed is None else audit.RoundScores.zeros(
                self.observed.num_directions),
        )
        return replicate(state, self.mesh)

    def round(
        self, state: ServerState, key: jax.Array, *, donate: bool = False
    ) -> tuple[ServerState, RoundMetrics]:
        """One DP-FedAvg round (jitted; compiles once per `donate`).

        With `donate`, the new state reuses `state`'s device buffers and `state` is
        deleted: for a loop that rebinds it (`run_rounds`). Else every round copies the
        whole state, per-client states included (DPD-fVAE sync "d" keeps each client's
        encoder and its Adam state: ~0.8 MB a client on mnist).
        """
        return (self._round_donating if donate else self._round)(
            state, self.data, self.canaries, self.observed, key)

    def lower(self, state: ServerState, key: jax.Array) -> jax.stages.Lowered:
        """The round lowered for `state` (e.g. `.compile().memory_analysis()`, `.as_text()`)."""
        return self._round.lower(state, self.data, self.canaries, self.observed, key)

    def compile(
        self, state: ServerState, key: jax.Array
    ) -> Callable[[ServerState, jax.Array], tuple[ServerState, RoundMetrics]]:
        """The round compiled ahead of time for `state` and `key`'s shapes (a benchmark's
        compile, timed apart from its calls): `(state, key) -> round(state, key)`."""
        compiled = self.lower(state, key).compile()
        return lambda s, k: compiled(s, self.data, self.canaries, self.observed, k)

    def cohort(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The cohort the round with `key` trains: (client indices, count), as in `sample`."""
        return self.sampler.sample(_round_keys(key)[0])

    def round_event(self) -> dp_event.DpEvent | None:
        """The DpEvent of one round (user level), None when no noise is added."""
        inner = self.aggregator.dp_event()
        return None if inner is None else self.sampler.dp_event(inner)

    def population_event(
        self, ledger: privacy.PrivacyLedger, population: int
    ) -> dp_event.DpEvent | None:
        """The ledger's rounds, each with its own noise, had `population` users existed.

        What the accountant alone says the same training would cost in a larger
        population (e.g. federated EMNIST's 3,400 writers, or 1M users): every recorded
        round keeps its noise and cohort size, only the population sampled from changes
        (so a run whose z changed on a resume is counted with each segment's z). A
        Poisson round's expected cohort is its recorded rate times the ledger's
        `num_users` (not this engine's cohort, which may differ). None for an empty ledger.

        Raises:
          ValueError: for a population that is not a whole number >= 1 or is smaller than
            a round's cohort, or a ledger that does not record its `num_users`.
        """
        if not ledger.entries:
            return None
        if not (privacy.is_whole_number(population) and population >= 1):
            raise ValueError(f"population must be a whole number >= 1, got {population}")
        recorded = ledger.metadata.get("num_users")
        if recorded is None:
            raise ValueError("the ledger does not record the population its rounds sampled "
                             "(metadata num_users): its cohort sizes are unknown")
        return dp_event.ComposedDpEvent([
            dp_event.SelfComposedDpEvent(
                _with_population(event, int(population), recorded), count)
            for event, count in ledger.entries
        ])

    def epsilon_with_population(
        self, ledger: privacy.PrivacyLedger, population: int, delta: float,
        accountant: str = "rdp",
    ) -> float | None:
        """eps of `population_event` at `delta`, under the ledger's neighbouring relation
        (None for an empty ledger or no support)."""
        event = self.population_event(ledger, population)
        if event is None:
            return None
        return privacy.epsilon(event, delta, ledger.relation, accountant)

    def all_rounds_audit(self, state: ServerState, delta: float) -> dict[str, Any]:
        """`audit.all_rounds` of the rounds that led to `state`, at `delta`, for an engine
        with `held_out` canaries."""
        if self.observed is None or self.canaries is None:
            raise ValueError("an engine without held_out canaries keeps no all-rounds scores")
        return audit.all_rounds(
            state.audit, self.canaries.num_directions, int(state.round), self.sampler.rate,
            self.aggregator.update_mechanism.noise_multiplier, delta)

    @property
    def num_users(self) -> int:
        """The users rounds sample from: the clients, or the subpopulation's population
        (the clients' number is then private and appears in no release)."""
        return self.sampler.sampled_population

    def user_ledger(
        self, delta: float, mechanism: str, target_epsilon: float | None = None, **metadata
    ) -> privacy.PrivacyLedger:
        """An empty ledger for this engine's releases: unit one user, its sampling's relation.

        The metadata states the mechanism, the population, the sampling and the noise;
        `metadata` adds the caller's fields (dataset, group, ...). Warns when `delta` >=
        1/num_users (`privacy.warn_if_delta_too_large`).
        """
        privacy.warn_if_delta_too_large(delta, self.num_users, "user")
        return privacy.PrivacyLedger(
            unit="user",
            neighboring_relation=privacy.relation_for(self.sampler.scheme).name.lower(),
            delta=delta,
            target_epsilon=target_epsilon,
            metadata={
                "mechanism": mechanism,
                "num_users": self.num_users,
                **({} if self.config.subpopulation is None else {
                    "members_estimate": self.config.subpopulation.members_estimate}),
                "sampling": str(self.sampler.scheme),
                "expected_clients_per_round": self.config.clients_per_round,
                "sampling_rate": self.sampler.rate,
                "l2_clip": self.config.l2_clip,
                "adaptive_clipping": self.config.adaptive_clipping is not None,
                "noise_multiplier": self.aggregator.noise_multiplier,
                **metadata,
            },
        )

    # The jitted round.

    def _round_impl(
        self, state: ServerState, data: ClientData, canaries: audit.Canaries | None,
        observed: audit.Canaries | None, key: jax.Array,
    ):
        sample_key, client_key, noise_key, count_key = _round_keys(key)
        indices, count = self.sampler.sample(sample_key)
        indices = sampling_lib.pad_to_multiple(indices, self.chunk_size)
        num_chunks = (count + self.chunk_size - 1) // self.chunk_size
        clip = state.clip_norm
        # The shapes of one client's sums, traced once here and reused for the zeros of the
        # loop's carry and of each device's scan: tracing `_per_client` (the client update,
        # e.g. a GAN's gradient penalty) is most of the round's tracing time.
        sums_shape = self._client_sums_shape(state, data, client_key)

        def run_chunk(chunk, client_states):
            idx, mask = sampling_lib.cohort_chunk(indices, count, chunk, self.chunk_size)
            keys = jax.vmap(jax.random.fold_in, (None, 0))(client_key, idx)
            states = jax.tree_util.tree_map(lambda s: s[idx], client_states)
            sums, new_states = self._sharded_chunk(
                state.params, clip, state.context, gather_clients(data, idx), states, keys, mask,
                sums_shape)
            slots = jnp.where(mask, idx, self.num_clients)  # padded slots write nowhere
            client_states = jax.tree_util.tree_map(
                lambda a, n: a.at[slots].set(n, mode="drop"), client_states, new_states)
            return sums, client_states

        zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)

        def body(carry):
            chunk, sums, client_states = carry
            chunk_sums, client_states = run_chunk(chunk, client_states)
            return chunk + 1, _tree_add(sums, chunk_sums), client_states

        _, sums, client_states = jax.lax.while_loop(
            lambda c: c[0] < num_chunks, body, (jnp.int32(0), zero, state.client_states))

        if canaries is not None:
            sums = sums._replace(delta=audit.insert(
                canaries, sums.delta, clip, self.sampler.rate,
                jax.random.fold_in(key, audit.STEP_KEY)))
        if self.config.l2_clip is None:
            mean = jax.tree_util.tree_map(lambda s: s / self.sampler.divisor, sums.delta)
        else:
            mean = self.aggregator.noised_mean(sums.delta, clip, noise_key)
        scores = state.audit
        if observed is not None:  # the release, post-processed: no key, no change to it
            scores = audit.observe(
                scores, observed, mean, clip, self.sampler.divisor, self.sampler.rate,
                self.aggregator.update_mechanism.noise_multiplier)
        next_clip, noised_fraction = self.aggregator.next_clip(clip, sums.below, count_key)
        pseudo_grad = jax.tree_util.tree_map(
            lambda m, p: (-m).astype(p.dtype), mean, state.params)
        updates, opt_state = self.server_optimizer.update(
            pseudo_grad, state.opt_state, state.params)
        new_state = ServerState(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            round=state.round + 1,
            clip_norm=next_clip.astype(jnp.float32),
            client_states=client_states,
            context=state.context,
            audit=scores,
        )
        clients = jnp.maximum(sums.clients, 1).astype(jnp.float32)
        metrics = RoundMetrics(
            released={"clip_norm": clip, "noised_unclipped_fraction": noised_fraction},
            diagnostics={
                "cohort_size": sums.clients,
                "nonfinite_updates": sums.nonfinite,
                "update_norm_mean": sums.norm / clients,
                "unclipped_fraction": sums.below / clients + 0.5,
                **{f"client_{name}": v / clients for name, v in sums.metrics.items()},
            },
        )
        return new_state, metrics

    def _per_client(self, params, clip, context, arrays, count, state, key, is_real):
        """One client's update, clipped: (its `_Sums`, its new state); nothing from a
        padded slot (`is_real` False) reaches the sums or its state."""
        out = self.client_update(params, state, OneClient(arrays, count), context, key)
        delta = jax.tree_util.tree_map(
            lambda n, o: n.astype(jnp.float32) - o.astype(jnp.float32), out.params, params)
        delta, norm, finite = clip_update(delta, clip if self.config.l2_clip is not None else None)
        real = is_real.astype(jnp.float32)
        sums = _Sums(
            delta=jax.tree_util.tree_map(lambda d: jnp.where(is_real, d, 0.0), delta),
            below=real * ((norm <= clip).astype(jnp.float32) - 0.5),
            nonfinite=(is_real & ~finite).astype(jnp.int32),
            clients=is_real.astype(jnp.int32),
            norm=real * norm,
            metrics={k: real * v.astype(jnp.float32) for k, v in out.metrics.items()},
        )
        new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(is_real, n, o), out.state, state)
        return sums, new_state

    def _client_sums_shape(self, state: ServerState, data: ClientData, client_key: jax.Array):
        """The shapes and dtypes of one client's `_Sums` (`jax.eval_shape`: a trace only)."""
        def one(x):
            return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)

        client = (
            jax.tree_util.tree_map(one, data.arrays),
            one(data.counts),
            jax.tree_util.tree_map(one, state.client_states),
            jax.ShapeDtypeStruct(client_key.shape, client_key.dtype),
            jax.ShapeDtypeStruct((), jnp.bool_),
        )
        return jax.eval_shape(
            self._per_client, state.params, state.clip_norm, state.context, *client)[0]

    def _sharded_chunk(self, params, clip, context, chunk_data, states, keys, mask, sums_shape):
        """Sums over one chunk of clients, split over the mesh; and their new states.

        `sums_shape`: one client's sums (`_client_sums_shape`), for the scan's zeros.
        """
        width = self.clients_per_device_step

        def device_body(params, clip, context, arrays, counts, states, keys, mask):
            # Varying over the mesh: each device's clients train their own copy (without
            # this, grad w.r.t. the replicated params would be summed over devices).
            params = _varying(params)
            per_client = functools.partial(self._per_client, params, clip, context)

            local = mask.shape[0]
            xs = jax.tree_util.tree_map(
                lambda x: x.reshape((local // width, width) + x.shape[1:]),
                (arrays, counts, states, keys, mask))
            zero = _varying(jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))

            def skip(arrays, count, state, key, is_real):
                del arrays, count, key, is_real
                return zero, state

            def step(acc, group):
                if width == 1:  # padded clients cost nothing: lax.cond skips them
                    one = jax.tree_util.tree_map(lambda x: x[0], group)
                    sums, new_state = jax.lax.cond(one[-1], per_client, skip, *one)
                    new_state = jax.tree_util.tree_map(lambda x: x[None], new_state)
                else:
                    sums, new_state = jax.vmap(per_client)(*group)
                    sums = jax.tree_util.tree_map(lambda x: jnp.sum(x, 0), sums)
                return _tree_add(acc, sums), new_state

            sums, new_states = jax.lax.scan(step, zero, xs)
            new_states = jax.tree_util.tree_map(
                lambda x: x.reshape((local,) + x.shape[2:]), new_states)
            return jax.lax.psum(sums, CLIENTS), new_states

        sharded = jax.shard_map(
            device_body,
            mesh=self.mesh,
            in_specs=(P(), P(), P(), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS)),
            out_specs=(P(), P(CLIENTS)),
        )
        return sharded(
            params, clip, context, chunk_data.arrays, chunk_data.counts, states, keys, mask)


def _at_least_one_client(data: ClientData) -> ClientData:
    """`data`, or, without clients (an empty subpopulation), one client of no examples:
    the round traces a client's update on it, and its sampler never picks it."""
    if data.num_clients:
        return ClientData(data.arrays, data.counts)
    arrays = jax.tree_util.tree_map(lambda a: np.zeros((1, *a.shape[1:]), a.dtype), data.arrays)
    return ClientData(arrays, np.zeros((1,), np.asarray(data.counts).dtype))


def _round_keys(key: jax.Array) -> jax.Array:
    """Keys of a round: cohort sampling, clients (folded with the client index), noises."""
    return jax.random.split(key, 4)


def _varying(tree: PyTree) -> PyTree:
    """Marks every leaf as varying over the `clients` axis (inside `shard_map`)."""
    return jax.tree_util.tree_map(lambda x: jax.lax.pcast(x, CLIENTS, to="varying"), tree)


def _with_population(
    event: dp_event.DpEvent, population: int, recorded_population: int
) -> dp_event.DpEvent:
    """A round's sampled event (`sampled_gaussian_event`), recorded with
    `recorded_population` users, had it been drawn from `population` users: the same
    (expected) cohort size and noise."""
    if isinstance(event, dp_event.PoissonSampledDpEvent):
        rate = event.sampling_probability * (recorded_population / population)
        if rate > 1:
            raise ValueError(f"{population} users are fewer than a round's expected cohort "
                             f"of {event.sampling_probability * recorded_population:g}")
        return dp_event.PoissonSampledDpEvent(rate, event.event)
    if isinstance(event, dp_event.SampledWithoutReplacementDpEvent):
        if event.sample_size > population:
            raise ValueError(f"{population} users are fewer than a round's cohort of "
                             f"{event.sample_size}")
        return dp_event.SampledWithoutReplacementDpEvent(
            population, event.sample_size, event.event)
    raise ValueError(f"not a sampled round event: {event}")
