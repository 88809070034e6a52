"""DP-FedAvg-GAN: a GAN trained on private, decentralized data with user-level DP.

"Generative Models for Effective ML on Private, Decentralized Datasets" (Augenstein et
al., ICLR 2020). One round:
1. the server broadcasts D (the engine's shared params) and G (the engine's read-only
   `context`);
2. each sampled client trains only D for a few steps on its own images against fakes
   of the fixed G (`wgan_gp.train_discriminator`) and returns D;
3. the DP-FedAvg engine (`dpfed.federated.DpFedAvg`) clips each client's D delta, zeroes
   non-finite ones, sums, adds N(0, (zC)^2), divides by the *expected* number of clients
   and applies the average with server SGD (lr 1);
4. the server trains G for a few steps from noise against the updated D
   (`wgan_gp.server_generator_update`): G never touches client data, so only D's
   aggregation is a release, and G inherits D's guarantee by post-processing.

The unit of privacy is one user (client). `DpFedAvgGan` is the engine plus step 4, with
the engine's `round(state, key)` / `round_event()` interface, so the federated host loop
(`dpfed.federated.run_rounds`) checkpoints, resumes and accounts it unchanged; the
state's `context` holds G (and its BatchNorm averages), so it is checkpointed too.

An audit run (`audit_canaries`, `dpfed.privacy.audit`) adds canary users: each is a
random direction in D's parameters, sampled as a user is (Poisson, the users' rate q),
that the engine adds at weight C to the clipped sum of D's deltas before the noise. At
the end D's change is scored against the directions (`audit.json`). The ledger is
unchanged: it accounts the real users; the audit run's D and G hold the canaries.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.federated import (
    AdaptiveClipping,
    ClientData,
    ClientOutput,
    ClientUpdateFn,
    DpFedAvg,
    DpFedAvgConfig,
    OneClient,
    RoundMetrics,
    ServerState,
    Subpopulation,
    run_rounds,
    write_privacy_summary,
)
from dpfed.generative import contract, polarity, wgan_gp
from dpfed.models import gan
from dpfed.train import seeds
from dpfed.train.canary_audit import draw_canaries, engine_canaries, write_audit
from dpfed.train.config import require_audit_applies, require_finite_floats, require_secret_seed
from dpfed.train.workdir import Workdir, environment_info, params_sha256

PyTree = Any
METHOD = "fedgan"
GENERATOR_FILE = "generator.msgpack"
SERVER_D_LEARNING_RATE = 1.0  # the averaged D delta is applied as is (paper: SGD, lr 1)
_ENGINE_STREAM, _GENERATOR_STREAM = 0, 1  # sub-keys of a round key
# Sub-keys of key(seed) for the initial D and G, apart from the round keys' root
# (`loop.ROUND_KEY_STREAM`, 1) and the evaluation key (`_EVAL_STREAM`). Until 2026-12-04 G was
# initialised from that root itself, so a flax name hash below the round count would have
# given one of G's initialisers a round's key.
_D_INIT_STREAM, _G_INIT_STREAM = 0, 2**31 - 3
_EVAL_STREAM = 2**31 - 1  # the polarity evaluation's samples


@dataclasses.dataclass(frozen=True)
class FedGanConfig:
    """One DP-FedAvg-GAN run over a group of clients (defaults: the paper's round).

    Attributes:
      gan: networks, noise dim, batch size, D/G steps and learning rates, GP weight.
      rounds: federated rounds (the paper: 1000).
      clients_per_round: expected (Poisson) or exact (fixed) cohort size (the paper: 10).
      sampling: "poisson" or "fixed" (the paper's public code draws a fixed cohort
        without replacement, `np.random.choice(..., replace=False)`; Poisson is the
        default because the DP-FedAvg accountant of McMahan et al. 2018 assumes it).
      l2_clip: per-client clip norm C of D's delta (the initial C if adaptive).
      noise_multiplier: z, noise std / C on the sum of clipped deltas (0: no DP).
      adaptive_clipping: quantile-tracking clip norm (Andrew et al. 2021), or None.
      delta: the delta of the user-level guarantee.
      seed: seeds the initial networks and every round.
      secret_seed: the seed is secret (`--secret_seed`): config.json and summary.json
        say "secret" in its place.
      eval_every: rounds between evaluations of G (inverted fraction of samples).
      checkpoint_every: rounds between checkpoints (state and ledger together).
      eval_samples: samples drawn at each evaluation.
      subpopulation: the clients are the taking-part users of a larger population, whose
        rounds sample it at q = clients_per_round / its population (`Subpopulation`).
      audit_canaries: an audit run's canary users, about this many inserted and as many
        held out (2K candidates, a fair coin each: `dpfed.privacy.audit`; Poisson
        sampling and noise only); 0: no audit.
    """

    gan: wgan_gp.WganGpConfig = wgan_gp.WganGpConfig()
    rounds: int = 1000
    clients_per_round: float = 10
    sampling: str = "poisson"
    l2_clip: float = 0.1
    noise_multiplier: float = 0.0
    adaptive_clipping: AdaptiveClipping | None = None
    delta: float = 1e-5
    seed: int = 0
    secret_seed: bool = False
    eval_every: int = 50
    checkpoint_every: int = 50
    eval_samples: int = 256
    subpopulation: Subpopulation | None = None
    audit_canaries: int = 0

    def __post_init__(self):
        require_finite_floats(self)
        require_secret_seed(self)
        for name in ("rounds", "eval_every", "checkpoint_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.clients_per_round > 0:
            raise ValueError(f"clients_per_round must be > 0, got {self.clients_per_round}")
        if not self.l2_clip > 0:
            raise ValueError(f"l2_clip must be > 0, got {self.l2_clip}")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        privacy.Sampling(self.sampling)  # validates the name
        require_audit_applies(self.audit_canaries, self.noise_multiplier == 0, self.sampling,
                              "noise_multiplier 0")


def discriminator_client_update(config: wgan_gp.WganGpConfig) -> ClientUpdateFn:
    """The engine's client hook: `(D, (), client, G, key) -> ClientOutput(D', (), {})`.

    The client sees D (shared params), G (the read-only context) and its own images;
    it returns D only: no metrics, no state, nothing about G.
    """

    def client_update(d_params, client_state, client: OneClient, g_variables, key):
        new_d = wgan_gp.train_discriminator(
            config, d_params, g_variables, client.arrays, client.count, key
        )
        return ClientOutput(params=new_d, state=client_state, metrics={})

    return client_update


# One jit for every engine: engines of one GAN config (fedgan_debug's two groups) share
# G's compiled update, which does not depend on their clients' data.
_generator_update = jax.jit(wgan_gp.server_generator_update, static_argnums=0)


def initial_discriminator(config: FedGanConfig) -> PyTree:
    """D's round-0 variables, from the run's seed."""
    key = jax.random.fold_in(seeds.root_key(config.seed), _D_INIT_STREAM)
    return gan.init_discriminator(config.gan.discriminator, key)


class DpFedAvgGan:
    """The DP-FedAvg engine on D, followed each round by the server's G update.

    Args:
      config: the run's settings.
      images: `[clients, max_n, 28, 28, 1]` client images in [0, 1] (0 = background).
      counts: `[clients]` real images per client.
      mesh: the engine's device mesh (default: all devices).

    Attributes:
      initial_d: D's round-0 variables (`initial_discriminator`).
      canaries: an audit run's (inserted, held-out) directions in D's parameter space,
        drawn from the seed (`canary_audit.draw_canaries`); the engine inserts the first. None
        without an audit.
    """

    def __init__(self, config: FedGanConfig, images: np.ndarray, counts: np.ndarray,
                 mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.initial_d = initial_discriminator(config)
        self.canaries = draw_canaries(config, self.initial_d)
        data = ClientData(
            arrays=np.asarray(wgan_gp.to_gan_range(np.asarray(images, np.float32))),
            counts=np.asarray(counts, np.int32),
        )
        self.engine = DpFedAvg(
            discriminator_client_update(config.gan),
            optax.sgd(SERVER_D_LEARNING_RATE),
            data,
            DpFedAvgConfig(
                clients_per_round=config.clients_per_round,
                sampling=config.sampling,
                l2_clip=config.l2_clip,
                noise_multiplier=config.noise_multiplier,
                adaptive_clipping=config.adaptive_clipping,
                subpopulation=config.subpopulation,
            ),
            mesh,
            **engine_canaries(self.canaries),
        )

    def init(self) -> ServerState:
        """Round-0 state: D as the shared params, G as the context (seeded)."""
        g_vars = gan.init_generator(
            self.config.gan.generator,
            jax.random.fold_in(seeds.root_key(self.config.seed), _G_INIT_STREAM),
            self.config.gan.noise_dim,
        )
        return self.engine.init(self.initial_d, context=g_vars)

    def generator_step(
        self, g_variables: PyTree, d_params: PyTree, key: jax.Array
    ) -> tuple[PyTree, wgan_gp.GeneratorStepMetrics]:
        """The server's G update: from noise drawn with `key` against D only."""
        noise = wgan_gp.generator_noise(key, self.config.gan)
        return _generator_update(self.config.gan, g_variables, d_params, noise)

    def round(
        self, state: ServerState, key: jax.Array, *, donate: bool = False
    ) -> tuple[ServerState, RoundMetrics]:
        """One DP-FedAvg round on D (clients), then G's update (server).

        G's step metrics are functions of noise and the released D: released metrics.
        `donate`: as `DpFedAvg.round` (`state` is deleted).
        """
        state, metrics = self.engine.round(
            state, jax.random.fold_in(key, _ENGINE_STREAM), donate=donate)
        g_vars, g_metrics = self.generator_step(
            state.context, state.params, jax.random.fold_in(key, _GENERATOR_STREAM)
        )
        released = {**metrics.released, **g_metrics._asdict()}
        return state._replace(context=g_vars), metrics._replace(released=released)

    def round_event(self) -> dp_event.DpEvent | None:
        """The user-level DpEvent of one round (only D's aggregation releases anything)."""
        return self.engine.round_event()


def sample_images(
    gan_config: wgan_gp.WganGpConfig, g_variables: PyTree, key: jax.Array, n: int
) -> np.ndarray:
    """`n` samples of G (running BatchNorm averages) as float32 `[n, 28, 28, 1]` in [0, 1]."""
    noise = jax.random.normal(key, (n, gan_config.noise_dim))
    images = _generate_eval(gan_config.generator, g_variables, noise)
    return np.asarray(wgan_gp.from_gan_range(images), np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _generate_eval(generator: gan.Generator, g_variables: PyTree, noise: jax.Array) -> jax.Array:
    return gan.generate(generator, g_variables, noise, train=False)


@dataclasses.dataclass(frozen=True)
class FedGanGenerator:
    """The contract's `Generator` for a trained DP-FedAvg-GAN (unconditional)."""

    gan_config: wgan_gp.WganGpConfig

    def sample(
        self, params: Any, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> tuple[jax.Array, None]:
        """`n` images in [0, 1] and no labels (G is unconditional; `labels` is ignored)."""
        del labels
        return jnp.asarray(sample_images(self.gan_config, params, key, n)), None


def new_ledger(config: FedGanConfig, gan_engine: DpFedAvgGan, group: str) -> privacy.PrivacyLedger:
    """An empty user-level ledger describing one GAN's run."""
    return gan_engine.engine.user_ledger(
        config.delta,
        "DP-FedAvg on the discriminator's deltas (per-client clip, Gaussian noise on the "
        "sum); the generator is trained on the server from noise only",
        group=group,
    )


def gan_config_json(config: wgan_gp.WganGpConfig) -> dict:
    """The networks' widths and the GAN settings, as JSON (to rebuild the generator)."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["discriminator"] = _module_fields(config.discriminator)
    out["generator"] = _module_fields(config.generator)
    return out


def _module_fields(module) -> dict:
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.name not in ("parent", "name")
    }


def gan_config_from_json(data: dict) -> wgan_gp.WganGpConfig:
    """Inverse of `gan_config_json`."""
    kwargs = dict(data)
    kwargs["discriminator"] = gan.Discriminator(**_module_kwargs(data["discriminator"]))
    kwargs["generator"] = gan.Generator(**_module_kwargs(data["generator"]))
    return wgan_gp.WganGpConfig(**kwargs)


def _module_kwargs(fields: dict[str, Any]) -> dict[str, Any]:
    """A module's JSON fields with its lists back as the tuples the module holds."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def train_gan(
    config: FedGanConfig,
    images: np.ndarray,
    counts: np.ndarray,
    workdir: str | os.PathLike,
    *,
    group: str = "all",
    log: Callable[[str], None] = print,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """Trains (or resumes) one DP-FedAvg-GAN on the given clients in `workdir`.

    Writes the workdir contract (ledger.json for private runs, metrics.jsonl,
    summary.json, checkpoints/) plus `generator.msgpack`, the released G, and in an audit
    run `audit.json` (`canary_audit.write_audit`, also the summary's `audit`). Each evaluation
    logs the inverted fraction of `eval_samples` samples (`polarity`): a function of G
    alone, so free of privacy cost.

    Returns:
      The summary dict (also in summary.json); `summary["generator"]` is not included:
      load it with `load_generator_variables(workdir)`.
    """
    started = time.time()
    wd = Workdir(workdir)
    gan_engine = DpFedAvgGan(config, images, counts, mesh)
    ledger = new_ledger(config, gan_engine, group) if config.noise_multiplier > 0 else None
    eval_key = seeds.stream_key(config.seed, _EVAL_STREAM)

    def evaluate(state: ServerState) -> dict:
        samples = sample_images(config.gan, state.context, eval_key, config.eval_samples)
        return {"inverted_fraction": polarity.inverted_fraction(samples)}

    result = run_rounds(
        gan_engine,
        gan_engine.init(),
        rounds=config.rounds,
        seed=config.seed,
        workdir=wd,
        ledger=ledger,
        evaluate=evaluate,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        desc=f"fedgan[{group}]",
        log=log,
        config=config,
        started=started,
    )
    g_vars = jax.device_get(result.state.context)
    # ledger.json before the released generator: a kill between them leaves a ledger that
    # covers every release in the workdir (the other order left one without its spend).
    privacy_fields = write_privacy_summary(result, gan_engine.engine, wd, config.delta)
    wd.write_bytes(GENERATOR_FILE, flax.serialization.to_bytes(g_vars))
    # An audit run's figures: D's change from round 0 scored against the canaries.
    audit_figures = write_audit(
        wd, gan_engine.canaries, gan_engine.initial_d, result.state.params, privacy_fields,
        trained=result.rounds_done > 0,
        all_rounds=functools.partial(gan_engine.engine.all_rounds_audit, result.state))
    summary = {
        "method": METHOD,
        "group": group,
        "num_users": gan_engine.engine.num_users,
        "sampling_rate": gan_engine.engine.sampler.rate,
        "inverted_fraction": result.evaluation["inverted_fraction"],
        **privacy_fields,
        "noise_multiplier": config.noise_multiplier,
        "rounds": result.rounds_done,
        "generator_sha256": params_sha256(g_vars),
        "diverged": result.diverged,
        "gan": gan_config_json(config.gan),
        "flags": seeds.public_fields({
            f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "gan"
        }),
        **result.clock.summary(),
        "seed": seeds.public(config),
        "environment": environment_info(),
        **({} if audit_figures is None else {"audit": audit_figures}),
    }
    wd.write_summary(summary)
    return summary


def load_generator_variables(workdir: Workdir) -> tuple[wgan_gp.WganGpConfig, PyTree]:
    """The GAN settings and the released G variables of a `train_gan` workdir."""
    gan_config = gan_config_from_json(workdir.read_json("summary.json")["gan"])
    template = gan.init_generator(gan_config.generator, jax.random.key(0), gan_config.noise_dim)
    g_vars = flax.serialization.from_bytes(template, workdir.file(GENERATOR_FILE).read_bytes())
    return gan_config, g_vars


def _load(workdir: Workdir) -> tuple[FedGanGenerator, PyTree]:
    gan_config, g_vars = load_generator_variables(workdir)
    return FedGanGenerator(gan_config), g_vars


contract.register_generator(METHOD, _load)
