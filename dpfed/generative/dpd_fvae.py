"""DPD-fVAE: a federated conditional VAE whose decoder alone is shared and made private.

Pfitzner & Arnrich (2022), "DPD-fVAE: Federated VAE with a Differentially-Private
Decoder" (arXiv 2211.11591; public code BjarnePfitzner/generative_fl_tff).

Every client trains a conditional VAE (`dpfed.models.vae`) on its own labelled images.
With `sync="d"` (the paper's method) **each client's encoder and its optimiser state stay
on the client across rounds** (the engine's per-client state, kept on device and sharded
with the cohort); only the decoder is broadcast, trained locally and averaged. The
released artefact is the decoder: sample z ~ N(0, I) and a label, decode (the generator
contract). With `sync="ed"` (the plain fVAE baseline) encoder and decoder are both
shared and no encoder persists on a client.

Privacy protects what leaves a client: the shared params (the decoder for sync "d", the
whole VAE for "ed"). Modes (`dp`):
- "none": plain FedAvg, no guarantee.
- "central": client-level DP-FedAvg on the shared params' deltas (the engine: Poisson
  client sampling with rate `client_fraction`, per-client clip C, Gaussian noise z C on
  the sum, divided by the expected cohort); unit one user, accounted per round (RDP/PLD).
  An audit run (`audit_canaries`: `dpfed.privacy.audit`) adds canary users, directions in
  the shared params' space drawn from the seed, sampled and clipped as users are.
- "local": per-example DP-SGD in every local step (each step a Poisson sample of the
  client's examples with rate q_c = min(B, n_c) / n_c; each example's gradient clipped to
  C; N(0, (zC)^2) added to the sum; divided by the expected batch size min(B, n_c)); the
  server averages without further noise. Each client composes its own steps over its own
  participations (unit one example of that client; add/remove-one, because of the
  Poisson batches; the client's size n_c is treated as public, as dataset sizes are in
  DP-SGD). The number of participations affordable at the target eps is computed ahead
  per client; a client whose count is spent trains nothing and sends back the decoder
  unchanged (a zero delta). The ledger states the worst client's guarantee.
  The clipped, noised gradient is that of the encoder *and* the decoder, also for sync
  "d" where the encoder never leaves the client: the encoder is hidden state that feeds
  every later decoder gradient, so an encoder trained on raw gradients would let one
  example move every other example's decoder gradient, and the per-example sensitivity C
  of the released decoder (hence the DP-SGD guarantee) would not hold. Clipping the joint
  per-example gradient costs no extra privacy: it is one Gaussian mechanism per step.
  This departs from the paper's code, whose local mode runs DP-SGD on the decoder only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, overload

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from dp_accounting import dp_event

from dpfed import data as data_lib
from dpfed import privacy
from dpfed.eval import figures
from dpfed.federated import (
    ClientData,
    ClientOutput,
    CohortSampler,
    DpFedAvg,
    DpFedAvgConfig,
    OneClient,
    ServerState,
    from_federated,
    init_local_states,
    local_batch_indices,
    masked_mean,
    run_rounds,
)
from dpfed.generative import contract
from dpfed.models import vae
from dpfed.privacy import audit
from dpfed.train import divergence, run_clock, seeds
from dpfed.train.canary_audit import draw_canaries, engine_canaries, write_audit
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.config import (
    ConfigError,
    require,
    require_audit_applies,
    require_data_dir_applies,
    require_finite_floats,
    require_no_privacy_settings,
    require_secret_seed,
    unused_privacy_flags,
)
from dpfed.train.dpsgd import make_optimizer
from dpfed.train.resume import Spent, calibrate_rest, checkpointed_spend
from dpfed.train.workdir import (
    CONFIG_FILE,
    DIAGNOSTICS_JSON,
    DIAGNOSTICS_JSON_NOTE,
    DIAGNOSTICS_NOTE,
    LEDGER_FILE,
    TORN_KEY,
    TrainingData,
    Workdir,
    environment_info,
    params_sha256,
)

PyTree = Any
METHOD = "dpd_fvae"
DECODER_FILE = "decoder.msgpack"
SAMPLES_PNG = "samples.png"
SYNCS = ("d", "ed")
DP_MODES = ("none", "central", "local")
OPTIMIZERS = ("adam", "sgd", "momentum")
SERVER_LEARNING_RATE = 1.0  # FedAvg: the averaged delta is applied as is


DEFAULT_NOISE_MULTIPLIER = 1.0  # when neither a noise multiplier nor a target is given


@dataclasses.dataclass(frozen=True)
class DpdFvaeConfig:
    """One DPD-fVAE run (the binary's flags; defaults: the paper's MNIST central setting,
    on mnist5k with 100 clients instead of 500 so each holds 40 images).

    Attributes:
      dataset, data_dir: the labelled image dataset (`dpfed.data.load`).
      num_clients: IID clients the train split is divided into (paper: 500 on MNIST).
      client_fraction: Poisson rate q of client sampling (expected cohort q N).
      rounds: federated rounds.
      local_epochs: passes over its data a client makes per round (steps:
        local_epochs * ceil(n_c / batch_size)).
      batch_size: examples per local step (the expected size in local DP mode).
      optimizer, learning_rate: the client optimiser (paper: Adam 1e-3).
      latent_dim, encoder_features, decoder_features: the VAE (paper: 8, (32, 64), (64, 32)).
      beta: weight of the KL term (paper: 0.01).
      sync: "d" (decoder shared, encoders stay on clients) or "ed" (both shared).
      dp: "none", "central" (client-level DP-FedAvg) or "local" (per-example DP-SGD).
      l2_clip: C: per-client delta clip (central) or per-example gradient clip (local;
        the joint gradient of encoder and decoder).
      noise_multiplier: z (paper: 1.0); None: calibrated to `target_epsilon`. Central
        needs z > 0; local accepts 0 (its ledger then states eps inf).
      target_epsilon: central: the run stops before exceeding it; local: each client's
        budget of participations; calibrates z when `noise_multiplier` is None.
      delta: delta of the guarantee.
      microbatch_size: local mode: per-example gradients materialised this many at a time.
      seed, eval_every, checkpoint_every: as in every trainer.
      audit_canaries: an audit run (`audit`; central DP only): about this many canary
        users inserted and as many held out (2K candidates, a fair coin each).
    """

    dataset: str = "mnist5k"
    data_dir: str | None = None
    num_clients: int = 100
    client_fraction: float = 0.2
    rounds: int = 50
    local_epochs: int = 10
    batch_size: int = 20
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    latent_dim: int = 8
    encoder_features: tuple[int, ...] = (32, 64)
    decoder_features: tuple[int, ...] = (64, 32)
    beta: float = 0.01
    sync: str = "d"
    dp: str = "central"
    l2_clip: float = 1.0
    noise_multiplier: float | None = None  # None: calibrated to target_epsilon, else 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    microbatch_size: int | None = None
    seed: int = 0
    secret_seed: bool = False  # seed drawn by `Workdir.pin_seed`; releases say "secret"
    eval_every: int = 10
    checkpoint_every: int = 10
    audit_canaries: int = 0  # ~K canary users inserted, ~K held out: `audit.draw_pair`

    def __post_init__(self):
        require_finite_floats(self)
        require_secret_seed(self)
        require_data_dir_applies(self.dataset, self.data_dir)
        for name in ("num_clients", "rounds", "local_epochs", "batch_size", "latent_dim",
                     "eval_every", "checkpoint_every"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(0 < self.client_fraction <= 1, "client_fraction", "must be in (0, 1]")
        require(self.client_fraction * self.num_clients >= 1, "client_fraction",
                f"expects {self.client_fraction * self.num_clients:g} clients per round (< 1)")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(bool(self.encoder_features) and min(self.encoder_features) > 0,
                "encoder_features", "must be positive widths")
        require(bool(self.decoder_features) and min(self.decoder_features) > 0,
                "decoder_features", "must be positive widths")
        require(self.beta >= 0, "beta", "must be >= 0")
        require(self.sync in SYNCS, "sync", f"must be one of {SYNCS}")
        require(self.dp in DP_MODES, "dp", f"must be one of {DP_MODES}")
        require(self.l2_clip > 0, "l2_clip", "must be > 0")
        require(0 < self.delta < 1, "delta", "must be in (0, 1)")
        require(self.noise_multiplier is None or self.noise_multiplier >= 0,
                "noise_multiplier", "must be >= 0")
        # The engine adds no noise at z 0 and keeps no ledger; local z 0 is accounted (eps inf).
        require(self.dp != "central" or self.noise_multiplier != 0, "noise_multiplier",
                "0 adds no noise, so no privacy: use --dp=none for a non-private run")
        require(self.target_epsilon is None or self.target_epsilon > 0,
                "target_epsilon", "must be > 0")
        require_no_privacy_settings(
            self.dp == "none", "--dp=none", self.noise_multiplier, self.target_epsilon)
        require(self.microbatch_size is None or self.microbatch_size > 0,
                "microbatch_size", "must be > 0")
        # Only local DP clips per example; elsewhere the flag would be silently ignored.
        require(self.microbatch_size is None or self.dp == "local", "microbatch_size",
                f"sizes local DP's per-example gradients; --dp={self.dp} has none")
        # A canary is a user whose clipped update enters the noised sum at the server: only
        # central DP has one (local DP noises each client's steps, unit one example).
        require(not self.audit_canaries or self.dp == "central", "audit_canaries",
                "canaries are users in the server's noised sum of clipped updates: they need "
                f"--dp=central, not --dp={self.dp}")
        require_audit_applies(self.audit_canaries, self.dp == "none", "poisson", "--dp=none")

    @property
    def clients_per_round(self) -> float:
        """The expected cohort size: client_fraction x num_clients."""
        return self.client_fraction * self.num_clients


def unused_flags(config: DpdFvaeConfig, evaluate: bool) -> dict[str, tuple[bool, str]]:
    """{flag: (whether this run's mode ignores it, why)} for the binary's flags with a
    default that only some modes use (`cli.refuse_unused` refuses them where given and
    ignored); `evaluate` is the binary's --evaluate (its --num_synthetic is no config field).
    """
    return {
        "num_synthetic": (not evaluate, "with --noevaluate (no samples are drawn; "
                          "experiments.evaluate takes --num_samples)"),
        **unused_privacy_flags(config.dp == "none", "--dp=none"),
    }


# The model and which of its parts leave a client.


def build_model(
    config: DpdFvaeConfig, num_classes: int, image_shape: tuple[int, int, int]
) -> tuple[vae.Encoder, vae.Decoder]:
    """The conditional VAE for this dataset (a shape the decoder cannot make: ConfigError)."""
    height, width, channels = image_shape
    try:
        decoder = vae.Decoder(num_classes, (height, width, channels), config.decoder_features)
    except ValueError as error:
        raise ConfigError("decoder_features", str(error)) from error
    return vae.Encoder(num_classes, config.latent_dim, config.encoder_features), decoder


def split_params(encoder_params: PyTree, decoder_params: PyTree, sync: str) -> tuple:
    """`(shared, local)`: what the server broadcasts and averages, and what stays on a client."""
    if sync == "d":
        return decoder_params, encoder_params
    return {"encoder": encoder_params, "decoder": decoder_params}, ()


def join_params(shared: PyTree, local: PyTree, sync: str) -> tuple[PyTree, PyTree]:
    """Inverse of `split_params`: `(encoder_params, decoder_params)`."""
    if sync == "d":
        return local, shared
    return shared["encoder"], shared["decoder"]


def decoder_of(shared: PyTree, sync: str) -> PyTree:
    """The decoder's params inside the server's shared params (the released artefact)."""
    return shared if sync == "d" else shared["decoder"]


class ClientState(NamedTuple):
    """What a client keeps across rounds (leading [num_clients] axis in the engine).

    Attributes:
      encoder: its encoder's params (sync "d"; `()` for "ed").
      encoder_opt_state: its encoder optimiser's state (sync "d"; `()` for "ed").
      participations: rounds it has trained in (int32).
      budget: rounds it may train in (int32; local DP: what its target eps affords).
    """

    encoder: PyTree
    encoder_opt_state: PyTree
    participations: jax.Array
    budget: jax.Array


@overload
def steps_per_round(config: DpdFvaeConfig, count: int) -> int: ...
@overload
def steps_per_round(config: DpdFvaeConfig, count: jax.Array) -> jax.Array: ...
def steps_per_round(config: DpdFvaeConfig, count: int | jax.Array) -> int | jax.Array:
    """Local steps of a client holding `count` examples: local_epochs * ceil(count / B)."""
    return config.local_epochs * ((count + config.batch_size - 1) // config.batch_size)


# The client update.


def local_dp_batch(key: jax.Array, client_mask: jax.Array, expected_batch: jax.Array) -> jax.Array:
    """A local-DP step's Poisson batch: each of the client's n_c examples (`client_mask`
    over its padded slots) independently with rate `expected_batch` / n_c, where
    `expected_batch` = min(B, n_c); padded slots never. bool `[max_n]`.

    The rate is the one each client's ledger event records (`local_participation_event`:
    expected size min(B, n_c) of population n_c), or a hair below it, never above
    (`privacy.bernoulli_at_most`)."""
    rate = expected_batch / jnp.maximum(jnp.sum(client_mask), 1)
    return privacy.bernoulli_at_most(key, rate, client_mask.shape) & client_mask


def make_client_update(
    config: DpdFvaeConfig,
    encoder: vae.Encoder,
    decoder: vae.Decoder,
    max_n: int,
    noise_multiplier: float,
) -> Callable[[PyTree, PyTree, OneClient, PyTree, jax.Array], ClientOutput]:
    """The engine's client hook: local VAE training (per-example DP-SGD if "local").

    Runs `steps_per_round(max_n)` scanned steps; steps past the client's own count, and
    every step of a client out of budget, leave params and optimiser states unchanged.
    The shared params' optimiser state restarts every round (FedAvg); the encoder's
    (sync "d") persists in the client state.
    """
    optimizer = make_optimizer(config.optimizer, config.learning_rate)
    batch = config.batch_size
    num_steps = steps_per_round(config, max_n)
    local_dp = config.dp == "local"
    mechanism = privacy.GaussianSumMechanism(config.l2_clip, noise_multiplier) if local_dp else None

    def losses(shared, local, images, labels, noise):
        enc, dec = join_params(shared, local, config.sync)
        return vae.example_losses(encoder, decoder, enc, dec, images, labels, noise, config.beta)

    # A local step's Poisson batch is gathered and processed `chunk` examples a pass, so
    # a step costs O(B), not O(max_n) (`privacy.chunked_sum`: never truncated).
    chunk = privacy.poisson_chunk_size(batch, population=max_n)

    def private_step(params, images, labels, noise, mask, expected_batch, key):
        """(mean loss, (mean squared error, mean KL)) over the batch `mask` selects, and
        the sum of its per-example clipped gradients of (shared, local), noised, /
        E[batch] (the client's size n_c, hence min(B, n_c), is treated as public)."""

        def example_loss(p, example):
            image, label, z_noise = example
            return losses(*p, image[None], label[None], z_noise[None])[0][0]

        def chunk_sums(idx, valid):
            examples = (images[idx], labels[idx], noise[idx])
            clipped = privacy.clipped_grad_sum(
                example_loss, params, examples, valid, config.l2_clip, config.microbatch_size)
            terms = losses(*params, *examples)  # a non-private diagnostic
            return clipped.grad_sum, tuple(jnp.sum(jnp.where(valid, t, 0.0)) for t in terms)

        (picked,) = jnp.nonzero(mask, size=mask.shape[0], fill_value=0)
        count = jnp.sum(mask, dtype=jnp.int32)
        grad_sum, sums = privacy.chunked_sum(chunk_sums, picked.astype(jnp.int32), count, chunk)
        loss, squared_error, kl = (x / jnp.maximum(count, 1) for x in sums)
        noised = mechanism.privatize(grad_sum, key)  # float32 until after the noise
        return (loss, (squared_error, kl)), privacy.divide_as(noised, expected_batch, params)

    def client_update(shared, client_state, client: OneClient, context, key) -> ClientOutput:
        del context
        images, labels = client.arrays
        has_state = isinstance(client_state, ClientState)
        local = client_state.encoder if has_state else ()
        local_opt = client_state.encoder_opt_state if has_state else optimizer.init(())
        active = client_state.participations < client_state.budget if has_state else True
        own_steps = steps_per_round(config, client.count)
        expected_batch = jnp.minimum(batch, client.count).astype(jnp.float32)  # local DP
        order_key, steps_key = jax.random.split(key)
        indices, masks = local_batch_indices(order_key, client.count, max_n, batch, num_steps)

        def step(carry, inputs):
            params, opt_states = carry
            s, idx, mask, k = inputs
            noise_key, poisson_key, dp_key = jax.random.split(k, 3)
            if local_dp:
                mask = local_dp_batch(poisson_key, client.mask, expected_batch)
                x, y = images, labels
            else:
                x, y = images[idx], labels[idx]
            noise = jax.random.normal(noise_key, (x.shape[0], encoder.latent_dim))

            def mean_loss(shared_p, local_p):
                loss, squared_error, kl = losses(shared_p, local_p, x, y, noise)
                return masked_mean(loss, mask), (masked_mean(squared_error, mask),
                                                 masked_mean(kl, mask))

            if local_dp:  # the loss is a non-private diagnostic; the gradient is private
                (loss, aux), (g_shared, g_local) = private_step(
                    params, x, y, noise, mask, expected_batch, dp_key)
            else:
                (loss, aux), (g_shared, g_local) = jax.value_and_grad(
                    mean_loss, (0, 1), has_aux=True)(*params)
            new_params, new_opt = [], []
            for g, opt_state, p in zip((g_shared, g_local), opt_states, params, strict=True):
                updates, opt_state = optimizer.update(g, opt_state, p)
                new_params.append(optax.apply_updates(p, updates))
                new_opt.append(opt_state)
            live = active & (s < own_steps)
            carry = jax.tree_util.tree_map(
                lambda n, o: jnp.where(live, n, o), (tuple(new_params), tuple(new_opt)), carry)
            return carry, (live, loss, *aux)

        # Steps are gated with `where` on `live`, which depends on the client's data; under
        # the engine's shard_map that makes the carry device-varying, so the fresh
        # optimiser state must be too: adding a data-derived zero does that (a no-op value).
        zero = jnp.zeros_like(client.count)
        init = jax.tree_util.tree_map(
            lambda x: x + zero.astype(x.dtype),
            ((shared, local), (optimizer.init(shared), local_opt)))
        xs = (jnp.arange(num_steps), indices, masks, jax.random.split(steps_key, num_steps))
        (params, opt_states), (live, loss, squared_error, kl) = jax.lax.scan(step, init, xs)
        new_state = client_state
        if has_state:
            new_state = ClientState(
                encoder=params[1],
                encoder_opt_state=opt_states[1],
                participations=client_state.participations + jnp.asarray(active, jnp.int32),
                budget=client_state.budget,
            )
        metrics = {
            "loss": masked_mean(loss, live),
            "squared_error": masked_mean(squared_error, live),
            "kl": masked_mean(kl, live),
            "active": jnp.asarray(active, jnp.float32),
        }
        return ClientOutput(params[0], new_state, metrics)

    return client_update


# Privacy accounting.


def local_participation_event(
    config: DpdFvaeConfig, count: int, noise_multiplier: float
) -> dp_event.DpEvent:
    """One participation of a client with `count` examples in local mode (unit: example):
    its local steps, each a Poisson-sampled Gaussian on a clipped sum."""
    return privacy.dpsgd_event(
        noise_multiplier, int(steps_per_round(config, count)), sampling="poisson",
        population=int(count), expected_size=min(config.batch_size, int(count)))


def central_event(config: DpdFvaeConfig, noise_multiplier: float, rounds: int) -> dp_event.DpEvent:
    """`rounds` rounds of client-level DP-FedAvg (unit: user)."""
    sampler = CohortSampler("poisson", config.num_clients, config.clients_per_round)
    return dp_event.SelfComposedDpEvent(
        sampler.dp_event(dp_event.GaussianDpEvent(noise_multiplier)), rounds)


def expected_participations(config: DpdFvaeConfig) -> int:
    """ceil(rounds * q): how many rounds a client trains in on average."""
    return max(1, math.ceil(config.rounds * config.client_fraction))


def resolve_noise_multiplier(
    config: DpdFvaeConfig, counts: np.ndarray, spent: Spent | None = None
) -> float:
    """The given z; else, at the target eps, the z that affords the run; else
    `DEFAULT_NOISE_MULTIPLIER`.

    Central: `rounds` rounds (on a resume, `spent` holds the checkpoint's round and
    ledger, and the remaining rounds are calibrated after it: `calibrate_rest`). Local:
    `expected_participations` for every client size (the largest z over the distinct
    sizes); a resumed local run keeps its checkpoint's z (`resume_noise_multiplier`).
    """
    if config.dp == "none":
        return 0.0
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    if config.target_epsilon is None:
        return DEFAULT_NOISE_MULTIPLIER
    relation = privacy.relation_for("poisson")
    try:
        if config.dp == "central":
            return calibrate_rest(
                lambda z: central_event(config, z, 1), config.rounds, spent,
                config.target_epsilon, config.delta, relation)
        participations = expected_participations(config)

        def client_event(n: int) -> Callable[[float], dp_event.DpEvent]:
            """A client of `n` examples' participations at noise multiplier z."""
            return lambda z: dp_event.SelfComposedDpEvent(
                local_participation_event(config, n, z), participations)

        return max(
            privacy.calibrate_noise_multiplier(
                client_event(int(n)), config.target_epsilon, config.delta, relation)
            for n in np.unique(counts))
    except privacy.CalibrationError as error:
        raise ConfigError("target_epsilon", str(error)) from error


# The checkpoint's record of the local mechanism's z: every participation of a run, over
# all its resumes, uses that one z, since the local ledger is recomputed from the
# clients' participation counts.
LOCAL_NOISE_KEY = "local_noise_multiplier"
LOCAL_TARGET_KEY = "local_target_epsilon"  # what set the clients' budgets (local DP)


def resume_noise_multiplier(
    config: DpdFvaeConfig, counts: np.ndarray, checkpointer: Checkpointer, workdir: Workdir,
    log: Callable[[str], None] = print, data: TrainingData | None = None,
) -> float:
    """z of this invocation: a resumed local-DP run keeps the z its checkpoint trained
    with (a changed `--target_epsilon` or `--rounds` changes the clients' budgets, not
    z); otherwise `resolve_noise_multiplier`, after what a central checkpoint spent
    (`checkpointed_spend`, which checks the config and `data` first)."""
    step = checkpointer.latest_step()
    saved = {} if step is None else checkpointer.restore_extra(step)
    if config.dp == "local" and saved.get(LOCAL_NOISE_KEY) is not None:
        return float(saved[LOCAL_NOISE_KEY])
    if (config.dp == "local" and step is not None and config.noise_multiplier is None
            and config.target_epsilon is not None):
        log(f"warning: the checkpoint of round {step} does not record its local noise "
            "multiplier (written by an older dpfed); it is recalibrated from the flags, which "
            "is right only if --target_epsilon and --rounds are unchanged since then")
    return resolve_noise_multiplier(
        config, counts, checkpointed_spend(checkpointer, workdir, config, data))


def refuse_logs_of_other_local_noise(
    workdir: Workdir, noise_multiplier: float, target_epsilon: float | None = None,
    checkpoint_round: int = 0,
) -> None:
    """Raises unless every local-DP release logged (`Workdir.read_released`) was made with
    `noise_multiplier`, and those past `checkpoint_round` with the clients' budgets of
    `target_epsilon` (the replay recomputes them: other budgets would stop other clients
    in the replayed rounds, whose logged releases they took part in).

    A resumed local run keeps its checkpoint's z (`resume_noise_multiplier`); with the
    checkpoints gone, z is calibrated afresh from this invocation's flags, and differs
    from the logged rounds' z if an earlier resume changed `--target_epsilon` or
    `--rounds`: replaying those rounds with it would leave what was logged in no
    ledger. Records written before z was logged pass. A torn record past the checkpoint
    (`workdir.TORN_KEY`) cut before its target was logged with config.json's target
    (`_pinned_target`); without one there it is refused: its budgets are unknown.

    Raises:
      ConfigError: naming "workdir", with the logged and the new z; or naming
        "target_epsilon", with the target of a round logged past the checkpoint.
    """
    records = workdir.read_released("round")
    for record in records:
        logged = record.get(LOCAL_NOISE_KEY)
        if logged is not None and logged != noise_multiplier:
            raise ConfigError(
                "workdir",
                f"a release logged round {record.get('round')} with local noise "
                f"multiplier {logged}, and this run would replay it with {noise_multiplier} "
                "(were checkpoints deleted after a resume that changed --target_epsilon or "
                "--rounds?): restore the checkpoints or use a new workdir",
            )
    for record in records:
        past_checkpoint = record.get("round", 0) > checkpoint_round
        if past_checkpoint and record.get(TORN_KEY) and LOCAL_TARGET_KEY not in record:
            record = {**record, LOCAL_TARGET_KEY: _pinned_target(workdir, record["round"])}
        target = record.get(LOCAL_TARGET_KEY, target_epsilon)
        if past_checkpoint and target != target_epsilon:
            raise ConfigError(
                "target_epsilon",
                f"the killed run logged round {record.get('round')} past its last checkpoint "
                f"(round {checkpoint_round}) with --target_epsilon={target}, which set the "
                "clients' budgets; replaying it with other budgets would leave what was "
                f"logged uncounted. Resume with --target_epsilon={target} until past round "
                f"{record.get('round')}, or use a new workdir",
            )


def _pinned_target(workdir: Workdir, torn_round: int) -> float | None:
    """The target of a torn local record cut before its own: config.json's.

    The invocation that logged it pinned its flags in config.json before logging
    anything (`resume.start` pins them after every check), and every later one that
    pinned its own first passed `refuse_logs_of_other_local_noise`, which compared its
    target with this one: config.json holds the target the torn record was logged with.

    Raises:
      ConfigError: naming "workdir", where config.json is missing, unreadable or names
        no target_epsilon (written by an older dpfed): its budgets are unknown.
    """
    pinned = workdir.read_pin(CONFIG_FILE, resuming=True)
    if pinned is None or "target_epsilon" not in pinned:
        raise ConfigError(
            "workdir",
            f"metrics.jsonl ends in round {torn_round}'s record, torn by a crash before its "
            f"{LOCAL_TARGET_KEY}, and {workdir.file(CONFIG_FILE)} names no target_epsilon: "
            "the replay cannot tell whether this run's clients' budgets are those it was "
            "logged with. Remove that line by hand and resume with the killed run's "
            "--target_epsilon, or use a new workdir",
        )
    return pinned["target_epsilon"]


def participation_budgets(
    config: DpdFvaeConfig, counts: np.ndarray, noise_multiplier: float
) -> np.ndarray:
    """Per client, the participations its target eps affords (local mode; else `rounds`).

    Raises:
      ConfigError: naming "target_epsilon", when no client affords one participation
        (nothing would train; the untrained decoder would be released under a DP label).
    """
    if config.dp != "local" or config.target_epsilon is None:
        return np.full(len(counts), config.rounds, np.int32)
    ledger = _local_ledger(config)  # empty: only asked what it would afford
    events = {int(n): local_participation_event(config, int(n), noise_multiplier)
              for n in np.unique(counts)}
    budgets = {n: ledger.affordable_count(event, config.rounds) for n, event in events.items()}
    if max(budgets.values()) == 0:
        cheapest = min(ledger.epsilon_with(event) for event in events.values())
        raise ConfigError(
            "target_epsilon",
            "cannot be met: one participation already costs a client eps >= "
            f"{privacy.format_upper(cheapest)} > "
            f"{config.target_epsilon} (local DP-SGD, noise multiplier {noise_multiplier:.4g}); "
            "raise the noise multiplier or the target",
        )
    return np.array([budgets[int(n)] for n in counts], np.int32)


def _local_ledger(config: DpdFvaeConfig, metadata: dict | None = None) -> privacy.PrivacyLedger:
    return privacy.PrivacyLedger(
        unit="example", neighboring_relation="add_or_remove_one", delta=config.delta,
        target_epsilon=config.target_epsilon, metadata=metadata or {})


def local_client_epsilons(
    config: DpdFvaeConfig, counts: np.ndarray, participations: np.ndarray,
    noise_multiplier: float,
) -> np.ndarray:
    """Each client's RDP eps at `delta` after its participations (local mode)."""
    cache: dict[tuple[int, int], float] = {}
    out = np.zeros(len(counts))
    for i, (n, p) in enumerate(zip(counts, participations, strict=True)):
        key = (int(n), int(p))
        if key not in cache:
            cache[key] = 0.0 if p == 0 else privacy.rdp_epsilon(
                dp_event.SelfComposedDpEvent(
                    local_participation_event(config, key[0], noise_multiplier), key[1]),
                config.delta)
        out[i] = cache[key]
    return out


def local_ledger(
    config: DpdFvaeConfig, counts: np.ndarray, participations: np.ndarray,
    budgets: np.ndarray, noise_multiplier: float,
) -> privacy.PrivacyLedger:
    """The worst client's ledger (unit: one example of one client), with every client's
    participations and eps summarised in the metadata."""
    eps = local_client_epsilons(config, counts, participations, noise_multiplier)
    worst = int(np.argmax(eps))
    ledger = _local_ledger(config, {
        "mechanism": "per-example DP-SGD on the whole VAE's gradient (encoder too: it "
        "feeds later decoder gradients) in every local step (Poisson batch of rate "
        "min(batch_size, n_c) / n_c, per-example clip, Gaussian noise on the sum); each "
        "client accounts its own steps; server aggregation adds no noise",
        "guarantee": "per client: the worst client's eps is reported (its events below)",
        "shared": "decoder" if config.sync == "d" else "encoder and decoder",
        "dataset": config.dataset,
        "num_clients": config.num_clients,
        "batch_size": config.batch_size,
        "local_epochs": config.local_epochs,
        "l2_clip": config.l2_clip,
        "noise_multiplier": noise_multiplier,
        "worst_client": worst,
        "worst_client_examples": int(counts[worst]),
        "worst_client_participations": int(participations[worst]),
        "participation_budget_min": int(budgets.min()),
        "clients_out_of_budget": int(np.sum(participations >= budgets)),
        "epsilon_rdp_client_mean": float(eps.mean()),
        "epsilon_rdp_client_max": float(eps.max()),
    })
    if participations[worst] > 0:
        n = int(counts[worst])
        ledger.record(
            privacy.sampled_gaussian_event(
                dp_event.GaussianDpEvent(noise_multiplier), sampling="poisson",
                population=n, expected_size=min(config.batch_size, n)),
            int(steps_per_round(config, n)) * int(participations[worst]))
    return ledger


def central_ledger(config: DpdFvaeConfig, engine: DpFedAvg) -> privacy.PrivacyLedger:
    """An empty client-level ledger (unit: user) for central mode."""
    return engine.user_ledger(
        config.delta,
        "DP-FedAvg on the shared params' deltas (per-client clip, Gaussian noise on the sum, "
        "divided by the expected cohort)",
        target_epsilon=config.target_epsilon,
        shared="decoder" if config.sync == "d" else "encoder and decoder",
        dataset=config.dataset,
    )


# The trainer: the engine, its initial state, and the release.


class DpdFvae:
    """The DP-FedAvg engine set up for one DPD-fVAE configuration.

    Args:
      config: the run's settings.
      num_classes, image_shape: of the dataset.
      clients: the clients' padded `(images, labels)` and counts.
      noise_multiplier: z of the central or local mechanism (0 for "none").
      mesh: the engine's device mesh (default: all devices).

    Attributes:
      initial: the round-0 `(shared, local)` params, drawn from the seed (host arrays).
      canaries: an audit run's (inserted, held-out) canaries in the shared params' space,
        drawn from the seed (the engine inserts the first); None without an audit.
    """

    def __init__(self, config: DpdFvaeConfig, num_classes: int, image_shape, clients: ClientData,
                 noise_multiplier: float, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.noise_multiplier = noise_multiplier
        self.encoder, self.decoder = build_model(config, num_classes, image_shape)
        self.counts = np.asarray(clients.counts)
        self.budgets = participation_budgets(config, self.counts, noise_multiplier)
        key = seeds.stream_key(config.seed, seeds.INIT_STREAM)
        # On the host: a round donates the device buffers of the state `init` builds.
        self.initial = jax.device_get(
            split_params(*vae.init_vae(self.encoder, self.decoder, key), config.sync))
        self.canaries = draw_canaries(config, self.initial[0])
        central = config.dp == "central"
        self.engine = DpFedAvg(
            make_client_update(config, self.encoder, self.decoder, clients.max_n,
                               noise_multiplier),
            optax.sgd(SERVER_LEARNING_RATE),
            clients,
            DpFedAvgConfig(
                clients_per_round=config.clients_per_round,
                sampling="poisson",
                l2_clip=config.l2_clip if central else None,
                noise_multiplier=noise_multiplier if central else 0.0,
            ),
            mesh,
            **engine_canaries(self.canaries),
        )

    @property
    def has_client_state(self) -> bool:
        """Clients keep state: their encoders (sync "d") or their budgets (local DP)."""
        return self.config.sync == "d" or self.config.dp == "local"

    def init(self) -> ServerState:
        """Round-0 state: every client starts from the same encoder (sync "d")."""
        shared, local = self.initial
        if not self.has_client_state:
            return self.engine.init(shared)
        optimizer = make_optimizer(self.config.optimizer, self.config.learning_rate)
        owned = init_local_states(local, optimizer, self.engine.num_clients)
        client_states = ClientState(
            encoder=owned.params,
            encoder_opt_state=owned.opt_state,
            participations=jnp.zeros(self.engine.num_clients, jnp.int32),
            budget=jnp.asarray(self.budgets),
        )
        return self.engine.init(shared, client_states=client_states)

    def adopt_budgets(self, state: ServerState) -> ServerState:
        """A restored state with this invocation's participation budgets.

        The budgets are what this run's target eps affords at its z (local DP), else its
        `--rounds`; a resume with a changed `--target_epsilon` or `--rounds` changes them.
        (Until 2026-12-04 only local runs adopted them: a central or non-private sync "d"
        run resumed with more rounds kept the old `--rounds` as every budget, and a client
        that had taken part in all of them sent zero deltas in every later round.)

        Raises:
          ConfigError: naming "target_epsilon", in local DP, when a client already took
            part in more rounds than the new target affords it: a lowered target cannot
            take back what was spent, and the decoder would be released above it (as
            `budget_stop` refuses for a central ledger). `run_rounds` applies it before
            the workdir is written (`resume_or_start`'s `on_resume`): a refused resume
            leaves config.json and the logs as they were.
        """
        clients = state.client_states
        participations = np.asarray(jax.device_get(clients.participations))
        over = participations > self.budgets
        if self.config.dp == "local" and over.any():
            raise ConfigError(
                "target_epsilon",
                f"{self.config.target_epsilon} is below what {int(over.sum())} of {len(over)} "
                f"clients already spent (up to {int(participations.max())} rounds at z "
                f"{self.noise_multiplier:.4g}): raise it, or use a new workdir")
        budget = jax.device_put(jnp.asarray(self.budgets), clients.budget.sharding)
        return state._replace(client_states=clients._replace(budget=budget))

    def participations(self, state: ServerState) -> np.ndarray:
        """Rounds each client has trained in (zeros when clients keep no state)."""
        if not self.has_client_state:
            return np.zeros(self.engine.num_clients, np.int32)
        return np.asarray(jax.device_get(state.client_states.participations))


@dataclasses.dataclass(frozen=True)
class DpdFvaeGenerator:
    """The contract's `Generator`: z ~ N(0, I) and a label through the decoder.

    Attributes:
      decoder: the decoder module.
      latent_dim: size of z.
      label_probs: the distribution of labels drawn when none are asked for (None: uniform).
    """

    decoder: vae.Decoder
    latent_dim: int
    label_probs: tuple[float, ...] | None = None

    def sample(
        self, params: Any, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """`n` images in [0, 1] and their int32 labels (the given ones, or drawn)."""
        label_key, z_key = jax.random.split(key)
        if labels is None:
            probs = None if self.label_probs is None else jnp.asarray(self.label_probs)
            labels = jax.random.choice(label_key, self.decoder.num_classes, (n,), p=probs)
        labels = jnp.asarray(labels, jnp.int32)
        return _generate(self.decoder, self.latent_dim, params, z_key, labels), labels


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(decoder: vae.Decoder, latent_dim: int, params, key, labels) -> jax.Array:
    return vae.generate(decoder, params, key, labels, latent_dim)


def model_json(trainer: DpdFvae) -> dict:
    """What `load_generator` needs to rebuild the decoder."""
    return {
        "num_classes": trainer.decoder.num_classes,
        "image_shape": list(trainer.decoder.image_shape),
        "latent_dim": trainer.encoder.latent_dim,
        "encoder_features": list(trainer.encoder.features),
        "decoder_features": list(trainer.decoder.features),
    }


def load_generator(workdir: Workdir) -> tuple[DpdFvaeGenerator, PyTree]:
    """The generator and the released decoder params of a `train` workdir."""
    model = workdir.read_json("summary.json")["model"]
    decoder = vae.Decoder(model["num_classes"], tuple(model["image_shape"]),
                          tuple(model["decoder_features"]))
    template = jax.jit(decoder.init)(
        jax.random.key(0), jnp.zeros((1, model["latent_dim"])), jnp.zeros((1,), jnp.int32))
    params = flax.serialization.from_bytes(template, workdir.file(DECODER_FILE).read_bytes())
    return DpdFvaeGenerator(decoder, model["latent_dim"]), params


contract.register_generator(METHOD, load_generator)


def federate(config: DpdFvaeConfig, train: data_lib.ImageDataset) -> ClientData:
    """The train split divided IID into `num_clients` clients (as in the paper)."""
    require(config.num_clients <= train.num_examples, "num_clients",
            f"must be <= the {train.num_examples} training examples")
    parts = data_lib.partition_iid(train.num_examples, config.num_clients, config.seed)
    return from_federated(data_lib.to_federated(train.images, train.labels, parts))


def train(config: DpdFvaeConfig, workdir: str, log: Callable[[str], None] = print,
          mesh: jax.sharding.Mesh | None = None) -> dict:
    """Trains (or resumes) DPD-fVAE in `workdir`; returns the summary dict.

    Writes ledger.json (private runs), metrics.jsonl, summary.json, report.md,
    decoder.msgpack (the released decoder), samples.png (10 samples per class),
    diagnostics.jsonl (cohort sizes, client losses: not a release), diagnostics.json
    (central and non-private runs with sync "d": the clients' participation counts, not a
    release), audit.json (an audit run: `audit.audit_run` of the shared params) and
    checkpoints/
    (the state, client encoders included, with the central ledger; the local ledger is
    recomputed from the clients' participation counts).
    """
    started = time.time()
    wd = Workdir(workdir)
    train_ds = data_lib.load(config.dataset, "train", data_dir=config.data_dir)
    clients = federate(config, train_ds)
    data = TrainingData.of(clients, data_lib.source_flag(config.dataset))
    with Checkpointer(wd.file("checkpoints")) as checkpointer:
        noise_multiplier = resume_noise_multiplier(
            config, np.asarray(clients.counts), checkpointer, wd, log, data)
        checkpoint_round = checkpointer.latest_step() or 0
    trainer = DpdFvae(config, train_ds.num_classes, train_ds.image_shape, clients,
                      noise_multiplier, mesh)
    ledger = central_ledger(config, trainer.engine) if config.dp == "central" else None

    def evaluate(state: ServerState) -> dict:
        if config.dp != "local":
            return {}
        participations = trainer.participations(state)
        eps = local_client_epsilons(config, trainer.counts, participations, noise_multiplier)
        return {"epsilon_rdp_worst_client": float(eps.max()),
                "clients_out_of_budget": int(np.sum(participations >= trainer.budgets)),
                LOCAL_NOISE_KEY: noise_multiplier, LOCAL_TARGET_KEY: config.target_epsilon}

    def worst_client_ledger(state: ServerState) -> privacy.PrivacyLedger:  # local DP
        return local_ledger(config, trainer.counts, trainer.participations(state),
                            trainer.budgets, noise_multiplier)

    if config.dp == "local":
        refuse_logs_of_other_local_noise(
            wd, noise_multiplier, config.target_epsilon, checkpoint_round)

    result = run_rounds(
        trainer.engine, trainer.init(), rounds=config.rounds, seed=config.seed, workdir=wd,
        ledger=ledger, evaluate=evaluate, eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every, desc=f"dpd_fvae[{config.sync}/{config.dp}]",
        log=log, config=config, data=data,
        extra={LOCAL_NOISE_KEY: noise_multiplier} if config.dp == "local" else None,
        on_resume=trainer.adopt_budgets if trainer.has_client_state else None, started=started,
        release_ledger=worst_client_ledger if config.dp == "local" else None)
    participations = trainer.participations(result.state)
    ledger = worst_client_ledger(result.state) if config.dp == "local" else result.ledger
    ledger_json = ledger.to_json() if ledger is not None else None
    if ledger_json is not None:
        wd.write_json(LEDGER_FILE, ledger_json)

    decoder_params = jax.device_get(decoder_of(result.state.params, config.sync))
    wd.write_bytes(DECODER_FILE, flax.serialization.to_bytes(decoder_params))
    generator = DpdFvaeGenerator(trainer.decoder, config.latent_dim)
    sample_key = seeds.stream_key(config.seed, seeds.SAMPLE_STREAM)
    samples = contract.sample_synthetic(
        generator, decoder_params, sample_key, 10 * train_ds.num_classes, train_ds.num_classes)
    figures.save_class_grid(wd.file(SAMPLES_PNG), samples.images, samples.labels,
                            train_ds.num_classes, title=f"DPD-fVAE samples ({_mode(config)})")
    # Counted only where clients keep state (sync "d" or local DP).
    counts = ({"participations_max": int(participations.max()),
               "participations_mean": float(participations.mean())}
              if trainer.has_client_state else {})
    if config.dp == "local":
        # Unit one example: the counts depend on no example (seeded client sampling, public
        # client sizes) and the ledger's eps is a function of them, so they are released.
        released = {**counts, "participation_budget": int(trainer.budgets.min())}
        diagnostics = None
    else:
        # Central (unit: one user) and non-private: participations_mean * num_clients is
        # the sum of the realised cohort sizes, a raw-data figure: not a release.
        released = {}
        diagnostics = {"note": DIAGNOSTICS_JSON_NOTE, **counts} if counts else None
    summary = {
        "method": METHOD,
        "mode": _mode(config),
        "epsilon_rdp": ledger_json["epsilon_rdp"] if ledger_json else None,
        "epsilon_pld": ledger_json["epsilon_pld"] if ledger_json else None,
        "delta": config.delta if ledger_json else None,
        "unit": {"central": "user", "local": "example"}.get(config.dp),
        "noise_multiplier": noise_multiplier,
        "rounds": result.rounds_done,
        "stopped_by_budget": result.last_round < config.rounds,
        **released,
        "decoder_sha256": params_sha256(decoder_params),
        "diverged": result.diverged,
        "model": model_json(trainer),
        **result.clock.summary(),
        **seeds.summary_fields(config),
        "environment": environment_info(),
    }
    audit_figures = write_audit(
        wd, trainer.canaries, trainer.initial[0], result.state.params, ledger_json,
        trained=result.rounds_done > 0,
        all_rounds=functools.partial(trainer.engine.all_rounds_audit, result.state))
    if audit_figures is not None:
        summary["audit"] = audit_figures
    if diagnostics is not None:
        wd.write_json(DIAGNOSTICS_JSON, diagnostics)
    wd.write_summary(summary)
    wd.write_report(render_report(config, summary, diagnostics is not None),
                    keep_evaluation=result.trained_nothing)
    return summary


def _mode(config: DpdFvaeConfig) -> str:
    return f"sync_{config.sync}, " + (
        "non-private" if config.dp == "none" else f"{config.dp} DP")


def render_report(config: DpdFvaeConfig, summary: dict, has_diagnostics_json: bool) -> str:
    """report.md: the run's privacy statement and key figures (`has_diagnostics_json`: the
    run wrote the clients' participation counts to `DIAGNOSTICS_JSON`)."""
    if config.dp == "none":
        privacy_line = "non-private: **no privacy guarantee**"
    elif config.dp == "central":
        privacy_line = (
            f"({privacy.format_upper(summary['epsilon_rdp'])}, {config.delta:g})-DP by RDP (PLD "
            f"{privacy.format_upper(summary['epsilon_pld'])}) for one **user** of "
            f"{config.num_clients}: "
            f"DP-FedAvg with Poisson rate {config.client_fraction:g}, clip {config.l2_clip:g}, "
            f"noise multiplier {summary['noise_multiplier']:.4g}")
    else:
        privacy_line = (
            f"every client's examples are ({privacy.format_upper(summary['epsilon_rdp'])}, "
            f"{config.delta:g})-DP (RDP; PLD {privacy.format_upper(summary['epsilon_pld'])}) "
            f"at worst (unit: one **example**; "
            f"most participations of any client {summary['participations_max']}, smallest "
            f"client budget {summary['participation_budget']}): local DP-SGD with clip "
            f"{config.l2_clip:g}, noise multiplier {summary['noise_multiplier']:.4g}")
    shared = "the decoder (encoders stay on the clients)" if config.sync == "d" else (
        "encoder and decoder")
    counts_note = (
        f" The clients' participation counts (their mean times the number of clients is the "
        f"sum of the realised cohort sizes) are in `{DIAGNOSTICS_JSON}`, on the same "
        f"terms." if has_diagnostics_json else "")
    return (
        f"# DPD-fVAE ({_mode(config)}) on {config.dataset}, {config.num_clients} IID clients\n\n"
        f"- shared: {shared}\n"
        f"- privacy: {privacy_line}\n"
        f"{audit.report_line(summary)}"
        f"- rounds: {summary['rounds']} (client fraction {config.client_fraction:g}, "
        f"{config.local_epochs} local epochs of batch {config.batch_size}, "
        f"{config.optimizer} lr {config.learning_rate:g})\n"
        f"- wall time: {run_clock.describe(summary)}; decoder sha256 "
        f"`{summary['decoder_sha256']}`\n"
        f"{divergence.report_line(summary)}\n"
        f"![samples per class]({SAMPLES_PNG})\n\n"
        f"{DIAGNOSTICS_NOTE}{counts_note}\n"
    )
