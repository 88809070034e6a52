"""DataLens training (Wang et al., CCS 2021): teachers, TopAgg votes, the student generator,
the privacy ledger, a resumable workdir and the released generator.

One generator step:
1. every teacher takes `d_steps` discriminator steps (`pretrain_steps` before the first
   aggregation) on its own partition against fresh samples of the current generator;
2. the generator draws `batch_size` samples x = G(z, y) (z ~ U[-1, 1]^z_dim, y uniform);
3. each teacher votes with TopAgg, on each sample (`vote_scope="sample"`: `batch_size`
   aggregations, as the paper and its public code do) or once on the whole batch
   (`"batch"`, our variant and the table rows' setting: one aggregation); the vote sums
   are noised (the DP release: one Gaussian event per aggregation) and thresholded
   (post-processing);
4. the generator takes one Adam step on sum ||x + step_size * aggregate - G(z, y)||^2
   (with `project_target`, the target is first clipped to the image range [0, 1], so a
   pixel already black is not pulled further down: post-processing, not in the paper).

An audit run (`audit_canaries`, `canaries`) adds canary teachers' votes to the vote sums of
step 3 before the noise (the same noise key) and accumulates every candidate's score on
the release in the state's "audit" entry, checkpointed with it; audit.json holds the
all-rounds figures (after ledger.json), and its generator is not for release.

Step t uses `fold_in(key(seed), t)`: a resumed run replays identical randomness, and the
checkpoint holds the train state and the ledger together, so resuming neither loses nor
double-counts privacy spend. Before step t the budget guard checks that one more step's
aggregations keep eps <= the target; training stops before the first step that would not.

Only DP releases (and what is computed from them) leave the run: `metrics.jsonl` holds
eps, the generator's loss on the released aggregates and the fraction of coordinates the
aggregate moved; teacher losses are functions of the private data and are not written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpfed import data as data_lib
from dpfed import privacy
from dpfed.data.partition import to_federated
from dpfed.federated.mesh import settle
from dpfed.generative import contract
from dpfed.generative.datalens import canaries
from dpfed.generative.datalens.partition import (
    PARTITION_RELATIONS,
    partition_teachers,
    public_partition_sizes,
)
from dpfed.generative.datalens.teachers import VOTE_SCOPES, TeacherEnsemble, make_mesh
from dpfed.generative.datalens.topagg import TopAgg
from dpfed.models.datalens_nets import OUTPUTS, StudentGenerator, TeacherDiscriminator
from dpfed.privacy import audit
from dpfed.train import divergence, preemption, run_clock, seeds
from dpfed.train.canary_audit import write_all_rounds_audit
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.config import (
    require,
    require_audit_count,
    require_data_dir_applies,
    require_finite_floats,
    require_secret_seed,
)
from dpfed.train.progress import Progress
from dpfed.train.resume import checkpoint_extra, require_first_step, resume_or_start
from dpfed.train.run_clock import RunClock
from dpfed.train.workdir import (
    LEDGER_FILE,
    TrainingData,
    Workdir,
    environment_info,
    params_sha256,
)

PyTree = Any
METHOD = "datalens"
GENERATOR_FILE = "generator.msgpack"
SAMPLES_PNG = "samples.png"


@dataclasses.dataclass(frozen=True)
class DataLensConfig:
    """Everything that defines a DataLens run (the binary's flags).

    Defaults are the mnist5k eps=10 row of `launch/tables/datalens/` (WORKSPACE.md
    explains how the paper's T=4000 / 60k-image settings were scaled to 4,000 images).
    """

    dataset: str = "mnist5k"
    num_teachers: int = 1000
    partition: str = "hash"
    topk: int = 300
    sigma: float = 800.0
    beta: float = 0.8
    vote_scope: str = "batch"
    grad_bound: float = 1e-4
    z_dim: int = 50
    d_steps: int = 1
    pretrain_steps: int = 10
    batch_size: int = 4
    real_batch: int | None = 8
    learning_rate: float = 2e-3
    teacher_learning_rate: float = 1e-3
    adam_beta1: float = 0.5
    step_size: float = 1e-3
    project_target: bool = False
    steps: int = 3000
    target_epsilon: float | None = None
    delta: float = 1e-5
    teacher_features: tuple[int, ...] = (8, 16)
    generator_hidden: int = 256
    generator_width: int = 32
    generator_output_bias: float = 0.0
    generator_output: str = "sigmoid"
    teacher_chunk: int = 4
    seed: int = 0
    secret_seed: bool = False  # seed drawn by `Workdir.pin_seed`; releases say "secret"
    eval_every: int = 10
    checkpoint_every: int = 20
    num_synthetic: int = 10000
    data_dir: str | None = None
    audit_canaries: int = 0  # ~K canary teachers inserted, ~K held out: `canaries`

    def __post_init__(self):
        require_finite_floats(self)
        require_secret_seed(self)
        require_data_dir_applies(self.dataset, self.data_dir)
        require(self.num_teachers >= 1, "num_teachers", "must be >= 1")
        require(
            self.partition in PARTITION_RELATIONS,
            "partition",
            f"must be one of {tuple(PARTITION_RELATIONS)}",
        )
        require(self.topk >= 1, "topk", "must be >= 1")
        require(self.sigma > 0, "sigma", "must be > 0")
        require(self.beta >= 0, "beta", "must be >= 0")
        require(self.vote_scope in VOTE_SCOPES, "vote_scope", f"must be one of {VOTE_SCOPES}")
        require(self.grad_bound > 0, "grad_bound", "must be > 0")
        require(self.z_dim >= 1, "z_dim", "must be >= 1")
        require(self.d_steps >= 0, "d_steps", "must be >= 0")
        require(self.pretrain_steps >= 0, "pretrain_steps", "must be >= 0")
        require(
            self.batch_size >= 2,
            "batch_size",
            "must be >= 2 (the generator normalises with batch statistics: one sample "
            "normalises to its bias, whatever z)",
        )
        require(self.real_batch is None or self.real_batch >= 1, "real_batch", "must be >= 1")
        require(
            self.real_batch is not None or self.partition != "hash",
            "real_batch",
            "0 (whole partitions) needs --partition=balanced: under hash partitions the "
            "largest partition's size, a count of private records, would set every "
            "teacher's minibatch length, and one record would move every teacher",
        )
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.teacher_learning_rate > 0, "teacher_learning_rate", "must be > 0")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        require(self.step_size > 0, "step_size", "must be > 0")
        require(self.steps >= 1, "steps", "must be >= 1")
        require(
            self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon", "must be > 0"
        )
        require(0 < self.delta < 1, "delta", "must be in (0, 1)")
        require(
            len(self.teacher_features) >= 1 and min(self.teacher_features) >= 1,
            "teacher_features",
            "must be positive widths",
        )
        require(self.generator_hidden >= 1, "generator_hidden", "must be >= 1")
        require(self.generator_width >= 1, "generator_width", "must be >= 1")
        require(
            self.generator_output in OUTPUTS,
            "generator_output",
            f"must be one of {tuple(OUTPUTS)}",
        )
        require(self.teacher_chunk >= 1, "teacher_chunk", "must be >= 1")
        require(self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        require(self.num_synthetic >= 20, "num_synthetic", "must be >= 20")
        require_audit_count(self.audit_canaries)

    def topagg(self) -> TopAgg:
        """The TopAgg mechanism of this run."""
        return TopAgg(k=self.topk, b=self.grad_bound, sigma=self.sigma, beta=self.beta)

    @property
    def aggregations_per_step(self) -> int:
        """Gaussian events of one generator step: one per sample, or one per batch."""
        return self.batch_size if self.vote_scope == "sample" else 1

    def relation(self) -> str:
        """The neighbouring relation under which the partition scheme is sound."""
        return PARTITION_RELATIONS[self.partition]


class DataLensGenerator:
    """The released student generator, following `dpfed.generative.contract`:
    `sample(params, key, n, labels=None) -> (images [n, H, W, C] in [0, 1], labels)`."""

    def __init__(self, module: StudentGenerator, z_dim: int):
        self.module = module
        self.z_dim = z_dim
        self._apply = jax.jit(module.apply)

    def latents(
        self, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """`(z ~ U[-1, 1]^z_dim, labels)` for `n` samples (labels uniform when None)."""
        z_key, label_key = jax.random.split(key)
        if labels is None:
            labels = jax.random.randint(label_key, (n,), 0, self.module.num_classes)
        z = jax.random.uniform(z_key, (n, self.z_dim), minval=-1.0, maxval=1.0)
        return z, jnp.asarray(labels, jnp.int32)

    def sample(
        self, params: PyTree, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """`n` images in [0, 1] and their int32 labels (the given ones, or uniform)."""
        z, labels = self.latents(key, n, labels)
        return self._apply(params, z, labels), labels


def build_generator(
    config: DataLensConfig, num_classes: int, image_shape: tuple[int, ...]
) -> DataLensGenerator:
    """The student generator of `config` for images of `image_shape` (H, W, C)."""
    height, width, channels = image_shape
    module = StudentGenerator(
        num_classes=num_classes,
        image_shape=(height, width, channels),
        hidden=config.generator_hidden,
        width=config.generator_width,
        output_bias=config.generator_output_bias,
        output=config.generator_output,
    )
    return DataLensGenerator(module, config.z_dim)


def adam(config: DataLensConfig, learning_rate: float) -> optax.GradientTransformation:
    """Adam with the paper's beta1 (0.5)."""
    return optax.adam(learning_rate, b1=config.adam_beta1)


class TeacherData:
    """The T partitions padded to `[padded, max_n, ...]` and sharded over the mesh.

    `max_n` slots per teacher: the largest partition, and under hash partitions (whose
    sizes count private records) at least `real_batch`, so that a teacher's minibatch
    is always `real_batch` long there (`train_step`); balanced sizes are public.
    `training_data` is their digest for `Workdir.pin_data`, taken before the mesh pads
    the teacher axis (a run resumes on another device count).
    """

    def __init__(self, train: data_lib.ImageDataset, config: DataLensConfig, ensemble):
        parts = partition_teachers(
            train.images, train.labels, config.num_teachers, config.seed, config.partition
        )
        at_least = (config.real_batch or 0) if config.partition == "hash" else 0
        self.max_n = max(max(len(part) for part in parts), at_least)
        fed = to_federated(train.images, train.labels, parts, max_n=self.max_n)
        self.training_data = TrainingData.of(
            (fed.images, fed.labels, fed.counts), data_lib.source_flag(config.dataset))
        self.arrays = ensemble.shard(
            (
                jnp.asarray(ensemble.pad(fed.images)),
                jnp.asarray(ensemble.pad(fed.labels)),
                jnp.asarray(ensemble.pad(fed.counts)),
            )
        )


class DataLens:
    """The jitted pieces of one run: teacher steps, the generator step, sampling."""

    def __init__(self, config: DataLensConfig, num_classes: int, image_shape, mesh=None):
        self.config = config
        self.topagg = config.topagg()
        self.generator = build_generator(config, num_classes, image_shape)
        self.image_shape = tuple(image_shape)
        self.ensemble = TeacherEnsemble(
            TeacherDiscriminator(num_classes, tuple(config.teacher_features)),
            adam(config, config.teacher_learning_rate),
            config.num_teachers,
            config.teacher_chunk,
            mesh if mesh is not None else make_mesh(),
        )
        self.student_optimizer = adam(config, config.learning_rate)
        self.teacher_step = jax.jit(self._teacher_step, static_argnames=("real_batch",))
        self.generator_step = jax.jit(self._generator_step)
        self._init_generator = jax.jit(self._init_generator_fn)  # one trace per DataLens

    def _init_generator_fn(self, key):
        z, labels = self.generator.latents(jax.random.fold_in(key, 0), 1)
        params = self.generator.module.init(jax.random.fold_in(key, 1), z, labels)
        return {"params": params, "opt_state": self.student_optimizer.init(params)}

    def init(self, key: jax.Array, candidates: int = 0) -> PyTree:
        """The initial train state (teachers sharded over the mesh); an audit run's
        (`candidates` canaries, `canaries`) also holds their all-rounds sums under "audit"
        (other runs' checkpoints keep their keys)."""
        image = jnp.zeros(self.image_shape, jnp.float32)
        replicated = NamedSharding(self.ensemble.mesh, P())  # same devices as the teachers
        state = {
            "teachers": self.ensemble.init(jax.random.fold_in(key, 2), image),
            "generator": jax.device_put(self._init_generator(key), replicated),
            "step": jax.device_put(jnp.int32(0), replicated),
        }
        if candidates:
            state["audit"] = jax.device_put(audit.RoundScores.zeros(candidates), replicated)
        return state

    def _teacher_step(self, state, data, ids, key, real_batch):
        """One discriminator step of every teacher against fresh generator samples."""
        sample_key, teacher_key = jax.random.split(key)
        fakes, fake_labels = self.generator.sample(
            state["generator"]["params"], sample_key, self.config.batch_size
        )
        teachers, loss = self.ensemble.train_step(
            state["teachers"], data, ids, fakes, fake_labels, teacher_key, real_batch
        )
        return {**state, "teachers": teachers}, loss

    def _generator_step(self, state, ids, key, audited=None):
        """TopAgg on `batch_size` fresh samples and one student Adam step towards them.

        `audited` (an audit run's `canaries.VoteCanaries`): this step's canary directions
        (from `fold_in(key, audit.STEP_KEY)`) go into the vote sum before the noise, whose
        key is unchanged, and the release's scores into `state["audit"]`.
        """
        sample_key, vote_key, noise_key = jax.random.split(key, 3)
        gen = state["generator"]
        z, labels = self.generator.latents(sample_key, self.config.batch_size)
        module = self.generator.module
        samples = module.apply(gen["params"], z, labels)
        vote_sum = self.ensemble.vote_sum(
            state["teachers"], ids, samples, labels, vote_key, self.topagg, self.config.vote_scope
        )
        num_rows = canaries.rows(self.config.vote_scope, self.config.batch_size)
        if audited is not None:
            directions = canaries.directions(jax.random.fold_in(key, audit.STEP_KEY),
                                             audited.candidates, vote_sum.shape, self.topagg,
                                             num_rows)
            vote_sum = canaries.insert(audited, directions, vote_sum, self.topagg, num_rows)
        noisy = self.topagg.privatize(vote_sum, noise_key)  # the DP release
        aggregate = self.topagg.threshold(noisy, self.config.num_teachers)  # post-processing
        target = samples + self.config.step_size * aggregate.reshape(samples.shape)
        if self.config.project_target:  # onto the image domain: no pull beyond black/white
            target = jnp.clip(target, 0.0, 1.0)

        def loss_fn(params):
            return jnp.sum((target - module.apply(params, z, labels)) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(gen["params"])
        updates, opt_state = self.student_optimizer.update(grads, gen["opt_state"], gen["params"])
        new_gen = {"params": optax.apply_updates(gen["params"], updates), "opt_state": opt_state}
        metrics = {
            "generator_loss": loss / self.config.batch_size,
            "agreement": jnp.mean(jnp.abs(aggregate)),
        }
        new_state = {**state, "generator": new_gen, "step": state["step"] + 1}
        if audited is not None:  # the release, post-processed
            new_state["audit"] = canaries.observe(state["audit"], directions, noisy,
                                                  self.topagg, num_rows)
        return new_state, metrics

    def train_step(
        self,
        state: PyTree,
        data: PyTree,
        ids: jax.Array,
        key: jax.Array,
        num_d_steps: int,
        real_batch: int,
        audited: canaries.VoteCanaries | None = None,
    ) -> tuple[PyTree, dict]:
        """`num_d_steps` teacher steps, then one generator step; key = fold_in(seed key, step).
        `audited`: an audit run's canaries (`_generator_step`).

        Each jitted call is settled before the next is dispatched: on several CPU devices
        XLA:CPU can deadlock otherwise (`dpfed.federated.mesh.waits_for_each_step`).
        """
        teacher_key, generator_key = jax.random.split(key)
        for i in range(num_d_steps):
            state, _ = settle(self.teacher_step(
                state, data, ids, jax.random.fold_in(teacher_key, i), real_batch=real_batch
            ))
        return settle(self.generator_step(state, ids, generator_key, audited))


# Fields that only steer the Python loop or the data: runs differing in them share one
# compiled DataLens (`build`).
_RUN_FIELDS = (
    "dataset", "partition", "d_steps", "pretrain_steps", "real_batch", "steps",
    "target_epsilon", "delta", "seed", "secret_seed", "eval_every", "checkpoint_every",
    "num_synthetic", "data_dir", "audit_canaries",
)


@functools.lru_cache(maxsize=4)
def _build(model_config: DataLensConfig, num_classes: int, image_shape, mesh) -> DataLens:
    return DataLens(model_config, num_classes, image_shape, mesh)


def build(
    config: DataLensConfig,
    num_classes: int,
    image_shape: tuple[int, ...],
    mesh: Mesh | None = None,
) -> DataLens:
    """The (cached) `DataLens` of `config`: same model settings, same compiled functions."""
    defaults = DataLensConfig()
    model_config = dataclasses.replace(config, **{f: getattr(defaults, f) for f in _RUN_FIELDS})
    return _build(model_config, num_classes, tuple(image_shape), mesh or make_mesh())


def d_steps_before(config: DataLensConfig, step: int) -> int:
    """Teacher steps before generator step `step` (`pretrain_steps` before the first)."""
    if step == 0 and config.pretrain_steps > 0:
        return config.pretrain_steps
    return config.d_steps


def mechanism_text(vote_scope: str) -> str:
    """The ledger's one-line description of an aggregation under `vote_scope`."""
    scope = {
        "sample": "per generated sample, T teacher votes (top-k of that sample's gradient",
        "batch": "per generator batch, T teacher votes (top-k of the whole batch's gradient",
    }[vote_scope]
    unit = {"sample": "aggregated sample", "batch": "aggregated batch"}[vote_scope]
    return (
        f"DataLens TopAgg: {scope}, stochastic sign) summed, Gaussian noise of std sigma per "
        f"coordinate, thresholded (post-processing); one Gaussian event per {unit}"
    )


def new_ledger(config: DataLensConfig, num_examples: int) -> privacy.PrivacyLedger:
    """The example-level ledger of a DataLens run."""
    topagg = config.topagg()
    return privacy.PrivacyLedger(
        unit="example",
        neighboring_relation=config.relation(),
        delta=config.delta,
        target_epsilon=config.target_epsilon,
        metadata={
            "mechanism": mechanism_text(config.vote_scope),
            "dataset": config.dataset,
            "dataset_size": num_examples,
            "num_teachers": config.num_teachers,
            "partition": config.partition,
            "partition_sizes": public_partition_sizes(
                config.partition, num_examples, config.num_teachers
            ),
            "topk": config.topk,
            "sigma": config.sigma,
            "beta": config.beta,
            "grad_bound": config.grad_bound,
            "l2_sensitivity": topagg.sensitivity,
            "noise_multiplier": topagg.noise_multiplier,
            "vote_scope": config.vote_scope,
            "aggregations_per_step": config.aggregations_per_step,
            "sampling": "none: every teacher sees all of its partition (no amplification)",
        },
    )


def train(config: DataLensConfig, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Trains (or resumes) DataLens in `workdir`; returns the summary dict.

    Writes ledger.json, metrics.jsonl, summary.json (with ``method: datalens``),
    report.md, generator.msgpack (the released generator), synthetic.npz (num_synthetic
    class-balanced samples), samples.png and checkpoints/.
    """
    started = time.time()
    event = config.topagg().dp_event()
    per_step = config.aggregations_per_step
    if config.target_epsilon is not None:  # before the data and teachers are built
        require_first_step(
            privacy.PrivacyLedger("example", config.relation(), config.delta,
                                  config.target_epsilon),
            event, per_step,
            key=f"step ({per_step} aggregations of noise multiplier "
            f"{config.topagg().noise_multiplier:.4g})",
        )
    wd = Workdir(workdir)
    train_ds = data_lib.load(config.dataset, "train", data_dir=config.data_dir)
    n = train_ds.num_examples
    require(
        config.num_teachers <= n,
        "num_teachers",
        f"must be <= the {n} training examples (disjoint partitions, no record reused)",
    )
    require(
        config.real_batch is None or config.real_batch <= n,
        "real_batch",
        f"must be <= the {n} training examples (every teacher's data is padded to it)",
    )
    dim = math.prod(train_ds.image_shape)
    if config.vote_scope == "batch":
        dim *= config.batch_size
    require(
        config.topk <= dim, "topk", f"must be <= the {dim} coordinates of one vote's scope"
    )
    privacy.warn_if_delta_too_large(config.delta, n, "example")

    lens = build(config, train_ds.num_classes, train_ds.image_shape)
    teacher_data = TeacherData(train_ds, config, lens.ensemble)
    ids = lens.ensemble.teacher_ids()
    root = seeds.root_key(config.seed)
    audited = canaries.draw(config.audit_canaries, config.seed)
    fresh = lens.init(seeds.stream_key(config.seed, seeds.INIT_STREAM),
                      0 if audited is None else audited.candidates)
    ledger = new_ledger(config, n)

    # Checkpoints hold the T real teachers alone: the padding depends on the mesh, so a
    # run resumes on another device count (`--cpu_devices`, another GPU box).
    def checkpointed(state):
        return {**state, "teachers": lens.ensemble.real_teachers(state["teachers"])}

    checkpointer = Checkpointer(wd.file("checkpoints"))
    start = resume_or_start(
        checkpointer, wd, checkpointed(fresh), ledger, step_of=lambda s: int(s["step"]),
        total=config.steps, event=event, events_per_step=per_step, config=config,
        data=teacher_data.training_data, log=log,
    )
    state = {
        **start.state,
        "teachers": lens.ensemble.with_padding(start.state["teachers"], fresh["teachers"]),
    }
    assert start.ledger is not None  # given a ledger, resume_or_start returns one
    ledger, start_step, last_step = start.ledger, start.step, start.last
    clock = RunClock(started, earlier=start.earlier_seconds)
    del fresh, start  # two more copies of every teacher: `state` alone is trained on
    progress = Progress(last_step, desc="datalens", start_step=start_step)
    watch = divergence.DivergenceWatch("step", log)

    def save(step):
        checkpointer.save(step, checkpointed(state), checkpoint_extra(ledger, wd, clock))

    eps = None
    with preemption.armed():
        for step in range(start_step, last_step):
            state, metrics = lens.train_step(
                state,
                teacher_data.arrays,
                ids,
                jax.random.fold_in(root, step),
                d_steps_before(config, step),
                min(config.real_batch or teacher_data.max_n, teacher_data.max_n),
                audited,
            )
            ledger.record(event, count=per_step)
            done = step + 1
            if done % config.eval_every == 0 or done == last_step:
                eps = ledger.epsilon()
                record = {"step": done, "epsilon_rdp": eps, "aggregations": ledger.num_releases}
                record.update({k: float(v) for k, v in metrics.items()})
                watch.check(state["generator"]["params"], record, done)
                wd.append_release(record, ledger)
            progress.update(done, wait_for=state, eps=privacy.format_upper(eps, 3, None),
                            agree=metrics["agreement"])
            preemption.save_or_stop(
                done, save, checkpointer, "step", every=config.checkpoint_every,
                last=last_step)
    checkpointer.close()

    ledger_json = ledger.to_json()
    # ledger.json before the released generator and samples: a kill between them leaves a
    # ledger that covers every release in the workdir (the other order left one without).
    wd.write_json(LEDGER_FILE, ledger_json)
    gen_params = state["generator"]["params"]
    wd.write_bytes(GENERATOR_FILE, flax.serialization.to_bytes(gen_params))
    synthetic = contract.sample_synthetic(
        lens.generator,
        gen_params,
        seeds.stream_key(config.seed, seeds.SAMPLE_STREAM),
        config.num_synthetic,
        train_ds.num_classes,
    )
    try:
        contract.save_synthetic(wd.file(contract.SYNTHETIC_FILE), synthetic)
    except ValueError as error:  # a diverged generator's NaN samples: still write the rest
        for stale in (contract.SYNTHETIC_FILE, SAMPLES_PNG):  # an earlier generator's
            wd.file(stale).unlink(missing_ok=True)
        log(f"warning: no {contract.SYNTHETIC_FILE} or {SAMPLES_PNG} written: the samples break "
            f"the contract ({error}); the generator diverged")
    else:
        save_samples_png(wd.file(SAMPLES_PNG), synthetic, train_ds.num_classes)

    records = wd.read_metrics()
    summary = {
        "method": METHOD,
        "epsilon_rdp": ledger_json["epsilon_rdp"],
        "epsilon_pld": ledger_json["epsilon_pld"],
        "delta": config.delta,
        "unit": "example",
        "neighboring_relation": config.relation(),
        "noise_multiplier": lens.topagg.noise_multiplier,
        "aggregations": ledger.num_releases,
        "steps": int(state["step"]),
        "stopped_by_budget": int(state["step"]) < config.steps,
        "partition_sizes": public_partition_sizes(config.partition, n, config.num_teachers),
        "params_sha256": params_sha256(gen_params),
        "diverged": divergence.diverged(gen_params, records[-1] if records else {}),
        **clock.summary(),
        **seeds.summary_fields(config),
        "environment": environment_info(),
    }
    num_rows = canaries.rows(config.vote_scope, config.batch_size)
    audit_figures = None if audited is None else write_all_rounds_audit(
        wd, audited.counts, ledger_json, trained=int(state["step"]) > 0,
        all_rounds=canaries.all_steps_audit(
            state["audit"], audited, int(state["step"]), lens.topagg, num_rows))
    if audit_figures is not None:
        summary["audit"] = audit_figures
    wd.write_summary(summary)
    wd.write_report(render_report(config, summary, records),
                    keep_evaluation=start_step == last_step)  # a finished run, rerun
    return summary


def save_samples_png(
    path: str | os.PathLike, synthetic: contract.SyntheticSet, num_classes: int
) -> None:
    """A grid of samples, one row per class (the evaluation suite's figure)."""
    from dpfed.eval import figures

    figures.save_class_grid(
        path, synthetic.images, synthetic.labels, num_classes, title="DataLens samples per class"
    )


def load_generator(workdir: Workdir) -> tuple[DataLensGenerator, PyTree]:
    """The generator loader registered with `dpfed.generative.contract` for "datalens"."""
    summary = workdir.read_json("summary.json")
    flags = dict(summary["flags"])
    flags["teacher_features"] = tuple(flags["teacher_features"])
    config = DataLensConfig(**flags)
    train_ds = data_lib.load(config.dataset, "train", data_dir=config.data_dir)
    generator = build_generator(config, train_ds.num_classes, train_ds.image_shape)
    z, labels = generator.latents(jax.random.key(0), 1)
    template = jax.jit(generator.module.init)(jax.random.key(0), z, labels)
    params = flax.serialization.from_bytes(template, workdir.file(GENERATOR_FILE).read_bytes())
    return generator, params


def render_report(config: DataLensConfig, summary: dict, metrics: list[dict]) -> str:
    """report.md: the key figures of a DataLens run."""
    rows = "\n".join(
        f"| {m['step']} | {m['aggregations']} | {privacy.format_upper(m.get('epsilon_rdp'))} | "
        f"{m['generator_loss']:.4g} | {m['agreement']:.4f} |"
        for m in metrics
    )
    budget = (
        f"stopped by the budget guard at target eps {config.target_epsilon}"
        if summary["stopped_by_budget"]
        else f"ran all {config.steps} steps"
    )
    return (
        f"# DataLens on {config.dataset}\n\n"
        f"- privacy: ({privacy.format_upper(summary['epsilon_rdp'])}, {config.delta:g})-DP by RDP "
        f"(PLD: eps = {privacy.format_upper(summary['epsilon_pld'])}); unit: one training example "
        f"({summary['neighboring_relation']}, via its teacher partition); "
        f"{summary['aggregations']} Gaussian aggregations of noise multiplier "
        f"sigma/sqrt(4k) = {summary['noise_multiplier']:.4g}; {budget}\n"
        f"- teachers: T = {config.num_teachers} ({config.partition} partition, "
        f"one vote per {config.vote_scope}, "
        f"{_sizes_text(summary['partition_sizes'])}), top-k {config.topk}, "
        f"sigma {config.sigma:g}, beta {config.beta:g}, "
        f"b {config.grad_bound:g}\n"
        f"- generator: {summary['steps']} steps of {config.batch_size} samples, Adam "
        f"lr {config.learning_rate:g}, z_dim {config.z_dim}, seed {seeds.public(config)}\n"
        f"{audit.report_line(summary)}"
        f"- wall time: {run_clock.describe(summary)}\n"
        f"- generator params sha256: `{summary['params_sha256']}`\n"
        f"{divergence.report_line(summary)}\n"
        f"![samples]({SAMPLES_PNG})\n\n"
        "## Training\n\n| step | aggregations | eps (RDP) | generator loss | agreement |\n"
        f"|---|---|---|---|---|\n{rows}\n"
    )


def _sizes_text(sizes: dict) -> str:
    if "expected" in sizes:  # hash partitions: the actual sizes are not published
        return f"{sizes['expected']:.3g} examples each on average"
    return f"{sizes['min']}-{sizes['max']} examples each"
