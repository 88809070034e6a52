"""DP-SGD training of an image classifier (Abadi et al., "Deep Learning with Differential
Privacy", CCS 2016), with a resumable workdir and a privacy ledger.

One step: sample a batch (Poisson with rate q = B / N by default, or a fixed-size
batch without replacement), clip every per-example gradient to L2 norm C, sum, add
N(0, (z C)^2) per coordinate, divide by the *expected* batch size B, apply the
optimiser. The whole step is one jitted function of (state, data, key); the batch is
processed in fixed-size physical chunks (`dpfed.privacy.sampling`), so the Poisson
sample is never truncated and nothing recompiles.

The unit of privacy is one training example. Poisson sampling is accounted under
add/remove-one, fixed-size sampling under replace-one. Step t uses the key
`fold_in(key(seed), t)`: a run resumed from a checkpoint replays exactly the same
noise, so resuming neither loses nor double-counts privacy spend.

An audit run (`audit_canaries`) also adds canary examples to the clipped sum and, each
step, accumulates the projections of the step's release (the noised mean gradient) on
the inserted and the held-out canaries in the state's "audit" entry, checkpointed with
it (the all-rounds audit: `audit.observe`, audit.json's `all_rounds`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from dp_accounting import dp_event

from dpfed import data as data_lib
from dpfed import models, privacy
from dpfed.privacy import audit, fast_clipping
from dpfed.train import divergence, preemption, run_clock, seeds
from dpfed.train.canary_audit import draw_canaries, write_audit
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
from dpfed.train.progress import Progress
from dpfed.train.resume import (
    Spent,
    calibrate_rest,
    checkpoint_extra,
    checkpointed_spend,
    resume_or_start,
)
from dpfed.train.run_clock import RunClock
from dpfed.train.workdir import (
    LEDGER_FILE,
    TrainingData,
    Workdir,
    environment_info,
    params_sha256,
)

PyTree = Any
OPTIMIZERS = ("sgd", "momentum", "adam")
# How per-example gradients are clipped: "vmap" materialises them (`clipped_grad_sum`),
# "fast" takes norms from one batched pass (`fast_clipping`, Dense/Conv models only).
CLIPPINGS = ("vmap", "fast")


DEFAULT_NOISE_MULTIPLIER = 1.1  # when neither a noise multiplier nor a target is given


@dataclasses.dataclass(frozen=True)
class DpSgdConfig:
    """Everything that defines a DP-SGD classifier run (the binary's flags)."""

    dataset: str = "mnist5k"
    model: str = "cnn"
    steps: int = 500
    batch_size: int = 256  # expected batch size (Poisson) or exact size (fixed)
    optimizer: str = "momentum"
    learning_rate: float = 0.5
    l2_clip: float = 1.0
    noise_multiplier: float | None = None  # None: calibrated to target_epsilon, else 1.1
    target_epsilon: float | None = None
    delta: float = 1e-5
    sampling: str = "poisson"
    microbatch: int | None = None  # per-example gradients materialised this many at a time
    clipping: str = "vmap"  # CLIPPINGS; "fast" takes no microbatch
    physical_batch: int | None = None  # chunk size of one jitted pass; default ~ B + 3 sqrt(B)
    nodp: bool = False
    seed: int = 0
    secret_seed: bool = False  # seed drawn by `Workdir.pin_seed`; releases say "secret"
    eval_every: int = 100
    checkpoint_every: int = 50
    data_dir: str | None = None
    audit_canaries: int = 0  # ~K canary examples inserted, ~K held out: `audit.draw_pair`

    def __post_init__(self):
        require_finite_floats(self)
        require_secret_seed(self)
        require_audit_applies(self.audit_canaries, self.nodp, self.sampling)
        require_data_dir_applies(self.dataset, self.data_dir)
        require(self.steps > 0, "steps", "must be > 0")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.l2_clip > 0, "l2_clip", "must be > 0")
        require(0 < self.delta < 1, "delta", "must be in (0, 1)")
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        require(self.sampling in tuple(privacy.Sampling), "sampling", "must be poisson or fixed")
        require(
            self.noise_multiplier is None or self.noise_multiplier >= 0,
            "noise_multiplier",
            "must be >= 0",
        )
        require(self.nodp or self.noise_multiplier != 0, "noise_multiplier",
                "0 adds no noise, so no privacy: use --nodp for a non-private run")
        require(
            self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon", "must be > 0"
        )
        require_no_privacy_settings(
            self.nodp, "--nodp", self.noise_multiplier, self.target_epsilon)
        require(self.microbatch is None or self.microbatch > 0, "microbatch", "must be > 0")
        # Only vmap clipping takes per-example gradients: elsewhere it was silently ignored.
        require(self.microbatch is None or not self.nodp, "microbatch",
                "has no effect with --nodp (no per-example gradients): drop it")
        require(self.microbatch is None or self.clipping != "fast", "microbatch",
                "has no effect with --clipping=fast (no per-example gradients): drop it")
        require(self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        require(self.clipping in CLIPPINGS, "clipping", f"must be one of {CLIPPINGS}")
        require(
            self.physical_batch is None or self.physical_batch > 0, "physical_batch", "must be > 0"
        )


def unused_flags(config: DpSgdConfig) -> dict[str, tuple[bool, str]]:
    """{flag: (whether `config`'s mode ignores it, why)} for the flags with a default that
    only some modes use (`cli.refuse_unused` refuses them where given and ignored)."""
    return unused_privacy_flags(config.nodp, "--nodp", ("clipping", "l2_clip", "delta"))


def default_physical_batch(expected: int) -> int:
    """B + 3 sqrt(B), rounded up to a multiple of 8: a larger sample takes a 2nd pass."""
    return privacy.poisson_chunk_size(expected, multiple=8)


def physical_batch(config: DpSgdConfig) -> int:
    """The examples of one jitted pass: `physical_batch`, else the Poisson default or the
    fixed batch size."""
    if config.physical_batch:
        return config.physical_batch
    if config.sampling == privacy.Sampling.POISSON:
        return default_physical_batch(config.batch_size)
    return config.batch_size


def check_fast_clipping_applies(
    model: nn.Module, params: PyTree, images: Any, labels: Any, config: DpSgdConfig
) -> None:
    """Refuses `clipping="fast"` for a model whose examples' losses mix (one pass of
    `physical_batch` examples, `fast_clipping.check_examples_independent`).

    `train` passes the public test split, not the private training data: a refusal that
    depended on training records (a NaN that some record causes) would be a release
    outside the ledger.

    Raises:
      ConfigError: on field "clipping", naming an example whose loss moves with others
        (or a layer the fast path does not support).
    """
    size = min(physical_batch(config), len(labels))
    batch = (jnp.asarray(images[:size]), jnp.asarray(labels[:size]))
    try:
        fast_clipping.check_examples_independent(batch_loss(model), params, batch)
    except (ValueError, NotImplementedError) as error:
        raise ConfigError(
            "clipping", f"fast clipping cannot clip {config.model}: {error}"
        ) from error


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """The optax optimiser applied to the (privatised) mean gradient."""
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    return optax.adam(learning_rate)


def example_loss(model: nn.Module) -> Callable[[PyTree, tuple[jax.Array, jax.Array]], jax.Array]:
    """Cross-entropy of ONE example (image [H,W,C], label []): the per-example loss."""

    def loss(params, example):
        image, label = example
        logits = model.apply(params, image[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, label[None])[0]

    return loss


def batch_loss(model: nn.Module) -> Callable[[PyTree, tuple[jax.Array, jax.Array]], jax.Array]:
    """`[B]` per-example cross-entropies from ONE batched call (what fast clipping needs)."""

    def loss(params, batch):
        images, labels = batch
        logits = model.apply(params, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    return loss


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: DpSgdConfig,
    num_examples: int,
    mechanism: privacy.GaussianSumMechanism | None,
    canaries: audit.Canaries | None = None,
    held_out: audit.Canaries | None = None,
) -> Callable:
    """Builds the jitted `step(state, images, labels, key) -> state`.

    `mechanism` None means non-private (plain mean gradient of the sampled batch).
    `canaries` (an audit run, `audit`; Poisson only): canary examples sampled at the
    examples' rate, each with a clipped gradient of -C times its direction.
    `held_out` (with `canaries`): the audit's held-out directions; each step then adds
    its release's standardised projections on the inserted, then the held-out ones to
    `state["audit"]` (`audit.observe`; `initial_state`).
    """
    loss = example_loss(model)
    batched = batch_loss(model)
    poisson = config.sampling == privacy.Sampling.POISSON
    chunk = physical_batch(config)

    rate = config.batch_size / num_examples  # q of Poisson sampling (records and canaries)

    def sample(key):
        if poisson:
            return privacy.poisson_sample(key, num_examples, rate)
        return privacy.fixed_size_sample(key, num_examples, config.batch_size)

    def step(state, images, labels, key, canaries=None, observed=None):
        sample_key, noise_key = jax.random.split(key)
        indices, count = sample(sample_key)
        params = state["params"]

        def chunk_sum(idx, mask):
            batch = (images[idx], labels[idx])
            if mechanism is None:  # one batched gradient of the masked loss sum
                return jax.grad(
                    lambda p: jnp.sum(jax.vmap(loss, in_axes=(None, 0))(p, batch) * mask)
                )(params)
            if config.clipping == "fast":
                clipped = fast_clipping.clipped_grad_sum_fast(
                    batched, params, batch, mask, mechanism.l2_clip
                )
            else:
                clipped = privacy.clipped_grad_sum(
                    loss, params, batch, mask, mechanism.l2_clip, config.microbatch
                )
            return clipped.grad_sum

        grad_sum = privacy.chunked_sum(chunk_sum, indices, count, chunk)
        if canaries is not None:  # -C u_c: descent moves the model along u_c
            grad_sum = audit.insert(canaries, grad_sum, -mechanism.l2_clip, rate,
                                    jax.random.fold_in(key, audit.STEP_KEY))
        if mechanism is None:
            denominator = jnp.maximum(count, 1).astype(jnp.float32)
        else:
            grad_sum = mechanism.privatize(grad_sum, noise_key)
            denominator = float(config.batch_size)  # the EXPECTED batch size
        grad = privacy.divide_as(grad_sum, denominator, params)  # float32 until here
        updates, opt_state = optimizer.update(grad, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        if observed is not None:  # the release, post-processed: no key, no change to it
            new_state["audit"] = observe_release(state["audit"], observed, grad, mechanism,
                                                 config.batch_size, rate)
        return new_state

    jitted = jax.jit(step)
    if canaries is None:
        return jitted
    observed = None if held_out is None else audit.concat(canaries, held_out)
    # Arguments, not jit constants.
    return functools.partial(jitted, canaries=canaries, observed=observed)


def observe_release(
    sums: audit.RoundScores, observed: audit.Canaries, grad: PyTree,
    mechanism: privacy.GaussianSumMechanism, batch_size: int, rate: float,
) -> audit.RoundScores:
    """`sums` plus one step's `audit.observe` of its release `grad` (the noised gradient
    sum / the expected batch `batch_size`) on the `observed` directions.

    A canary example adds -C u_c to the gradient sum, so that descent moves the model
    along +u_c: observed is minus the release (the model's direction of travel), on
    which the canary's participation moves s = <-grad, u_c> B / C by +1.
    """
    travel = jax.tree_util.tree_map(jnp.negative, grad)
    return audit.observe(sums, observed, travel, jnp.float32(mechanism.l2_clip), float(batch_size),
                         rate, mechanism.noise_multiplier)


def initial_state(
    params: PyTree, optimizer: optax.GradientTransformation,
    canaries: tuple[audit.Canaries, audit.Canaries] | None = None,
) -> dict[str, Any]:
    """The step-0 state; an audit run's (`canaries`: inserted, held out) also holds the
    all-rounds sums of its candidates under "audit" (other runs' checkpoints keep their
    keys)."""
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    if canaries is not None:
        state["audit"] = audit.RoundScores.zeros(
            canaries[0].num_directions + canaries[1].num_directions)
    return state


def all_steps_audit(
    state: dict[str, Any], canaries: tuple[audit.Canaries, audit.Canaries], rate: float,
    noise_multiplier: float,
) -> Callable[[float], dict[str, Any]]:
    """`audit.all_rounds` at a delta of an audit run's steps up to `state` (its "audit"
    sums, `make_train_step`), examples and canaries sampled at `rate`."""
    return functools.partial(audit.all_rounds, state["audit"], canaries[0].num_directions,
                             int(state["step"]), rate, noise_multiplier)


def make_evaluate(model: nn.Module, batch_size: int = 500) -> Callable:
    """Returns `evaluate(params, images, labels) -> (accuracy, mean loss)` (host floats)."""

    @jax.jit
    def batch_stats(params, images, labels):
        logits = model.apply(params, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(jnp.argmax(logits, -1) == labels), jnp.sum(loss)

    def evaluate(params, images, labels):
        correct, total_loss = 0.0, 0.0
        for start in range(0, len(labels), batch_size):
            c, s = batch_stats(
                params, images[start : start + batch_size], labels[start : start + batch_size]
            )
            correct += float(c)
            total_loss += float(s)
        return correct / len(labels), total_loss / len(labels)

    return evaluate


def step_event(
    config: DpSgdConfig, noise_multiplier: float, num_examples: int
) -> dp_event.DpEvent:
    """The DpEvent of ONE DP-SGD step."""
    return privacy.sampled_gaussian_event(
        privacy.GaussianSumMechanism(config.l2_clip, noise_multiplier).dp_event(),
        sampling=config.sampling,
        population=num_examples,
        expected_size=config.batch_size,
    )


def resolve_noise_multiplier(
    config: DpSgdConfig, num_examples: int, spent: Spent | None = None
) -> float:
    """The given noise multiplier, or the one calibrated so `steps` steps meet the target
    (`DEFAULT_NOISE_MULTIPLIER` when neither is given).

    On a resume (`spent`: the checkpoint's step and ledger) the remaining steps are
    calibrated against what is already spent (`dpfed.train.resume.calibrate_rest`).
    """
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    if config.target_epsilon is None:
        return DEFAULT_NOISE_MULTIPLIER
    try:
        return calibrate_rest(
            lambda z: step_event(config, z, num_examples),
            config.steps,
            spent,
            config.target_epsilon,
            config.delta,
            privacy.relation_for(config.sampling),
        )
    except privacy.CalibrationError as error:
        raise ConfigError("target_epsilon", str(error)) from error


def new_ledger(
    config: DpSgdConfig, noise_multiplier: float, num_examples: int
) -> privacy.PrivacyLedger:
    """An empty example-level ledger describing this run."""
    relation = privacy.relation_for(config.sampling)
    return privacy.PrivacyLedger(
        unit="example",
        neighboring_relation=relation.name.lower(),
        delta=config.delta,
        target_epsilon=config.target_epsilon,
        metadata={
            "mechanism": "DP-SGD (clipped per-example gradient sum + Gaussian noise)",
            "dataset": config.dataset,
            "dataset_size": num_examples,
            "sampling": config.sampling,
            "expected_batch_size": config.batch_size,
            "l2_clip": config.l2_clip,
            "noise_multiplier": noise_multiplier,
        },
    )


def train(config: DpSgdConfig, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Trains (or resumes) a DP-SGD classifier in `workdir`; returns the summary dict.

    Writes ledger.json, metrics.jsonl, summary.json, report.md and checkpoints/.
    """
    started = time.time()
    wd = Workdir(workdir)
    train_ds = data_lib.load(config.dataset, "train", data_dir=config.data_dir)
    test_ds = data_lib.load(config.dataset, "test", data_dir=config.data_dir)
    n = train_ds.num_examples
    require(config.batch_size <= n, "batch_size", f"must be <= the {n} training examples")
    data = TrainingData.of(
        (train_ds.images, train_ds.labels), data_lib.source_flag(config.dataset))
    if not config.nodp:
        privacy.warn_if_delta_too_large(config.delta, n, "example")

    model = models.get_classifier(config.model, train_ds.num_classes)
    optimizer = make_optimizer(config.optimizer, config.learning_rate)
    root = seeds.root_key(config.seed)
    params = jax.jit(model.init)(
        seeds.stream_key(config.seed, seeds.INIT_STREAM), jnp.asarray(train_ds.images[:1]))
    canaries = draw_canaries(config, params)
    state = initial_state(params, optimizer, canaries)
    if config.clipping == "fast" and not config.nodp:
        check_fast_clipping_applies(model, params, test_ds.images, test_ds.labels, config)

    checkpointer = Checkpointer(wd.file("checkpoints"))
    if config.nodp:
        noise_multiplier, mechanism, ledger, event = None, None, None, None
    else:
        spent = checkpointed_spend(checkpointer, wd, config, data)
        noise_multiplier = resolve_noise_multiplier(config, n, spent)
        mechanism = privacy.GaussianSumMechanism(config.l2_clip, noise_multiplier)
        ledger = new_ledger(config, noise_multiplier, n)
        event = step_event(config, noise_multiplier, n)

    start = resume_or_start(
        checkpointer, wd, state, ledger, step_of=lambda s: int(s["step"]), total=config.steps,
        event=event, config=config, data=data, log=log,
    )
    state, ledger, start_step, last_step = start.state, start.ledger, start.step, start.last
    clock = RunClock(started, earlier=start.earlier_seconds)

    images, labels = jnp.asarray(train_ds.images), jnp.asarray(train_ds.labels)
    test_images, test_labels = jnp.asarray(test_ds.images), jnp.asarray(test_ds.labels)
    train_step = make_train_step(model, optimizer, config, n, mechanism,
                                 *(() if canaries is None else canaries))
    evaluate = make_evaluate(model)
    progress = Progress(last_step, desc="dpsgd", start_step=start_step)
    watch = divergence.DivergenceWatch("step", log)

    def save(step):
        checkpointer.save(step, state, checkpoint_extra(ledger, wd, clock))

    accuracy = loss = eps = None
    with preemption.armed():
        for step in range(start_step, last_step):
            state = train_step(state, images, labels, jax.random.fold_in(root, step))
            if ledger is not None:
                ledger.record(event)
            done = step + 1
            if done % config.eval_every == 0 or done == last_step:
                eps = ledger.epsilon() if ledger is not None else None
                accuracy, loss = evaluate(state["params"], test_images, test_labels)
                record = {"step": done, "test_accuracy": accuracy, "test_loss": loss,
                          "epsilon_rdp": eps}
                watch.check(state["params"], record, done)
                wd.append_release(record, ledger)
            progress.update(done, wait_for=state, eps=privacy.format_upper(eps, 3, None),
                            acc=accuracy)
            preemption.save_or_stop(
                done, save, checkpointer, "step", every=config.checkpoint_every,
                last=last_step)
    checkpointer.close()

    if accuracy is None:  # nothing left to run (resumed a finished run)
        accuracy, loss = evaluate(state["params"], test_images, test_labels)
        watch.check(state["params"], {"test_loss": loss}, last_step)  # diverged: said again
    ledger_json = ledger.to_json() if ledger is not None else None
    if ledger_json is not None:
        wd.write_json(LEDGER_FILE, ledger_json)
    summary = {
        "test_accuracy": accuracy,
        "test_loss": loss,
        "epsilon_rdp": ledger_json["epsilon_rdp"] if ledger_json else None,
        "epsilon_pld": ledger_json["epsilon_pld"] if ledger_json else None,
        "delta": None if config.nodp else config.delta,
        "noise_multiplier": noise_multiplier,
        "steps": int(state["step"]),
        "params_sha256": params_sha256(state["params"]),
        "diverged": divergence.diverged(state["params"], {"test_loss": loss}),
        **clock.summary(),
        **seeds.summary_fields(config),
        "environment": environment_info(),
    }
    audit_figures = write_audit(
        wd, canaries, params, state["params"], ledger_json, trained=int(state["step"]) > 0,
        all_rounds=None if canaries is None or noise_multiplier is None else all_steps_audit(
            state, canaries, config.batch_size / n, noise_multiplier))
    if audit_figures is not None:
        summary["audit"] = audit_figures
    wd.write_summary(summary)
    wd.write_report(render_report(config, summary, wd.read_metrics()),
                    keep_evaluation=start_step == last_step)  # a finished run, rerun
    return summary


def render_report(config: DpSgdConfig, summary: dict, metrics: list[dict]) -> str:
    """report.md: the key figures of a DP-SGD run."""
    privacy_line = (
        "non-private baseline (no clipping, no noise): **no privacy guarantee**"
        if config.nodp
        else (
            f"({privacy.format_upper(summary['epsilon_rdp'])}, {config.delta:g})-DP by RDP "
            f"(PLD: eps = {privacy.format_upper(summary['epsilon_pld'])}); "
            f"unit: one training example; "
            f"{config.sampling} sampling, noise multiplier {summary['noise_multiplier']:.4g}, "
            f"clip {config.l2_clip:g}"
        )
    )
    rows = "\n".join(
        f"| {m['step']} | {m['test_accuracy']:.4f} | {m['test_loss']:.4f} | "
        f"{privacy.format_upper(m.get('epsilon_rdp'))} |"
        for m in metrics
    )
    return (
        f"# DP-SGD classifier: {config.model} on {config.dataset}\n\n"
        f"- test accuracy: **{summary['test_accuracy']:.4f}** after {summary['steps']} steps\n"
        f"- privacy: {privacy_line}\n"
        f"{audit.report_line(summary)}"
        f"- expected batch size {config.batch_size}, optimiser {config.optimizer} "
        f"(lr {config.learning_rate:g}), seed {seeds.public(config)}\n"
        f"- wall time: {run_clock.describe(summary)}\n"
        f"- params sha256: `{summary['params_sha256']}`\n"
        f"{divergence.report_line(summary)}\n"
        "## Evaluations\n\n| step | test accuracy | test loss | eps (RDP) |\n|---|---|---|---|\n"
        f"{rows}\n"
    )
