"""DP-FedAvg training of an image classifier over simulated clients, with a workdir.

The training function behind `experiments/fedavg_classifier.py`: a dataset split into
clients (IID or Dirichlet label skew), user-level DP-FedAvg (McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models"), optionally with adaptive
clipping (Andrew et al. 2021), evaluated on the central test split and per client.
The unit of privacy is one *user* (client): everything a client holds may change.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from dp_accounting import dp_event

from dpfed import data as data_lib
from dpfed import models, privacy
from dpfed.federated import evaluation, local
from dpfed.federated.aggregation import AdaptiveClipping, PrivateAggregator
from dpfed.federated.client_data import ClientData, from_federated
from dpfed.federated.dp_fedavg import DpFedAvg, DpFedAvgConfig, ServerState
from dpfed.federated.loop import OTHER_POPULATIONS, run_rounds
from dpfed.federated.sampling import CohortSampler
from dpfed.models import layers
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
from dpfed.train.dpsgd import make_evaluate, make_optimizer
from dpfed.train.resume import Spent, calibrate_rest, checkpointed_spend
from dpfed.train.workdir import (
    DIAGNOSTICS_NOTE,
    LEDGER_FILE,
    TrainingData,
    Workdir,
    environment_info,
    params_sha256,
)

OPTIMIZERS = ("sgd", "momentum", "adam")
PARTITIONS = ("iid", "dirichlet", "dirichlet_mix", "natural")


@dataclasses.dataclass(frozen=True)
class FedAvgClassifierConfig:
    """Everything that defines a federated classifier run (the binary's flags)."""

    dataset: str = "mnist5k"
    model: str = "cnn"
    conv: str = "auto"  # the CNN's convolutions: dpfed.models.layers.CONV_IMPLS
    num_clients: int = 100
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    rounds: int = 100
    clients_per_round: int = 10  # expected (Poisson) or exact (fixed) cohort size
    local_steps: int = 5
    local_batch_size: int = 20
    client_learning_rate: float = 0.05
    server_optimizer: str = "sgd"
    server_learning_rate: float = 1.0
    l2_clip: float = 0.5
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None  # default: clients_per_round / 20
    sampling: str = "poisson"
    nodp: bool = False
    seed: int = 0
    secret_seed: bool = False  # seed drawn by `Workdir.pin_seed`; releases say "secret"
    eval_every: int = 10
    checkpoint_every: int = 10
    chunk_size: int | None = None
    clients_per_device_step: int | None = None
    data_dir: str | None = None
    audit_canaries: int = 0  # ~K canary clients inserted, ~K held out: `audit.draw_pair`

    def __post_init__(self):
        require_finite_floats(self)
        require_secret_seed(self)
        require_data_dir_applies(self.dataset, self.data_dir)
        positive = ("num_clients", "rounds", "clients_per_round", "local_steps",
                    "local_batch_size", "eval_every", "checkpoint_every")
        for name in positive:
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.clients_per_round <= self.num_clients, "clients_per_round",
                 f"must be <= --num_clients={self.num_clients}")
        require(self.conv in layers.CONV_IMPLS, "conv", f"must be one of {layers.CONV_IMPLS}")
        require(self.partition in PARTITIONS, "partition", f"must be one of {PARTITIONS}")
        require(self.dirichlet_alpha > 0, "dirichlet_alpha", "must be > 0")
        require(self.client_learning_rate > 0, "client_learning_rate", "must be > 0")
        require(self.server_learning_rate > 0, "server_learning_rate", "must be > 0")
        require(self.server_optimizer in OPTIMIZERS, "server_optimizer",
                 f"must be one of {OPTIMIZERS}")
        require(self.l2_clip > 0, "l2_clip", "must be > 0")
        require(0 < self.delta < 1, "delta", "must be in (0, 1)")
        require(self.sampling in tuple(privacy.Sampling), "sampling", "must be poisson or fixed")
        require(self.noise_multiplier is None or self.noise_multiplier >= 0,
                 "noise_multiplier", "must be >= 0")
        require(self.target_epsilon is None or self.target_epsilon > 0,
                 "target_epsilon", "must be > 0")
        require(self.nodp or self.noise_multiplier is not None or self.target_epsilon is not None,
                 "noise_multiplier", "give --noise_multiplier or --target_epsilon (or --nodp)")
        require(self.nodp or self.noise_multiplier != 0, "noise_multiplier",
                 "0 adds no noise, so no privacy: use --nodp for a non-private run")
        require_no_privacy_settings(
            self.nodp, "--nodp", self.noise_multiplier, self.target_epsilon)
        require(not (self.nodp and self.adaptive_clipping), "adaptive_clipping",
                 "adapts the clip of the private aggregate: it does not apply with --nodp")
        require(0 < self.target_quantile < 1, "target_quantile", "must be in (0, 1)")
        require(self.clip_learning_rate > 0, "clip_learning_rate", "must be > 0")
        require(self.clipped_count_stddev is None or self.clipped_count_stddev > 0,
                 "clipped_count_stddev", "must be > 0")
        require(self.clipped_count_stddev is None or self.adaptive_clipping,
                 "clipped_count_stddev", "has no effect without --adaptive_clipping (no "
                 "clipped count is released): drop it")
        require(self.chunk_size is None or self.chunk_size > 0, "chunk_size", "must be > 0")
        require(self.clients_per_device_step is None or self.clients_per_device_step > 0,
                 "clients_per_device_step", "must be > 0")
        require_audit_applies(self.audit_canaries, self.nodp, self.sampling)


def unused_flags(config: FedAvgClassifierConfig) -> dict[str, tuple[bool, str]]:
    """{flag: (whether `config`'s mode ignores it, why)} for the flags with a default that
    only some modes use (`cli.refuse_unused` refuses them where given and ignored)."""
    adaptive = "without --adaptive_clipping (the clip norm stays --l2_clip)"
    return {
        "dirichlet_alpha": (config.partition in ("iid", "natural"),
                            f"with --partition={config.partition} (no Dirichlet label skew)"),
        "target_quantile": (not config.adaptive_clipping, adaptive),
        "clip_learning_rate": (not config.adaptive_clipping, adaptive),
        "conv": (config.model != "cnn", f"with --model={config.model} (no convolutions)"),
        **unused_privacy_flags(config.nodp, "--nodp"),
    }


def make_model(config: FedAvgClassifierConfig, num_classes: int) -> nn.Module:
    """The classifier of `config`; the CNN's convolutions per `config.conv` ("auto": patch
    convolutions on CPU and GPU, where `nn.Conv` in the engine's loops and vmap is slower)."""
    extra = {"conv": config.conv} if config.model == "cnn" else {}
    return models.get_classifier(config.model, num_classes, **extra)


def federate(config: FedAvgClassifierConfig, train: data_lib.ImageDataset) -> ClientData:
    """Splits the training set into `num_clients` clients: IID, label-skewed by alpha, or
    one client per natural user of the dataset (`user_ids`, e.g. CelebA's identities).

    Raises:
      ConfigError: naming "partition" for a natural split of a dataset without users, or
        "num_clients" when it is not that dataset's number of users or a split fails.
    """
    if config.partition == "natural":
        if train.user_ids is None:
            raise ConfigError(
                "partition", f"natural needs a dataset with users (celeb_a); "
                f"{config.dataset} has none: use iid, dirichlet or dirichlet_mix")
        parts = data_lib.partition_natural(train.user_ids)
        require(len(parts) == config.num_clients, "num_clients",
                f"--partition=natural gives one client per user: {config.dataset} has "
                f"{len(parts)} users in its train split")
        return from_federated(data_lib.to_federated(train.images, train.labels, parts))
    try:
        if config.partition == "iid":
            parts = data_lib.partition_iid(train.num_examples, config.num_clients, config.seed)
        elif config.partition == "dirichlet_mix":
            parts = data_lib.partition_dirichlet_mix(
                train.labels, config.num_clients, config.dirichlet_alpha, config.seed)
        else:
            parts = data_lib.partition_dirichlet(
                train.labels, config.num_clients, config.dirichlet_alpha, config.seed)
    except ValueError as error:
        hint = ("; or --partition=dirichlet_mix, whose clients all get an equal share"
                if config.partition == "dirichlet" else "")
        raise ConfigError("num_clients", f"{error}{hint}") from error
    return from_federated(data_lib.to_federated(train.images, train.labels, parts))


def classifier_loss(model: nn.Module) -> local.LossFn:
    """Masked mean cross-entropy of a batch (the client's local objective), with accuracy."""

    def loss_fn(shared, local_params, batch, mask, context, key):
        del local_params, context, key
        images, labels = batch
        logits = model.apply(shared, images)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return local.masked_mean(losses, mask), {"accuracy": local.masked_mean(accuracy, mask)}

    return loss_fn


def example_accuracy(model: nn.Module) -> evaluation.ExampleFn:
    """Whether each example of a batch is classified right (1.0 or 0.0): averaged over a
    client's examples, that client's accuracy (federated evaluation)."""

    def example_fn(params, batch):
        images, labels = batch
        return {"accuracy": (jnp.argmax(model.apply(params, images), -1) == labels)
                .astype(jnp.float32)}

    return example_fn


def resolve_noise_multiplier(config: FedAvgClassifierConfig, spent: Spent | None = None) -> float:
    """The given z, or the one calibrated so `rounds` rounds meet the target eps.

    On a resume (`spent`: the checkpoint's round and ledger) the remaining rounds are
    calibrated against what is already spent (`dpfed.train.resume.calibrate_rest`).
    """
    if config.nodp:
        return 0.0
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    assert config.target_epsilon is not None  # one of the three (`__post_init__`)
    sampler = CohortSampler(config.sampling, config.num_clients, config.clients_per_round)
    try:
        # The adaptive pair (z_d, 2 sb) costs exactly one Gaussian of multiplier z.
        return calibrate_rest(
            lambda z: sampler.dp_event(dp_event.GaussianDpEvent(z)), config.rounds, spent,
            config.target_epsilon, config.delta, privacy.relation_for(config.sampling))
    except privacy.CalibrationError as error:
        raise ConfigError("target_epsilon", str(error)) from error


def engine_config(config: FedAvgClassifierConfig, noise_multiplier: float) -> DpFedAvgConfig:
    """The engine's settings; a noise split that cannot work is a flag error."""
    adaptive = None
    if config.adaptive_clipping:
        adaptive = AdaptiveClipping(
            config.target_quantile, config.clip_learning_rate, config.clipped_count_stddev)
        try:
            PrivateAggregator(noise_multiplier, config.clients_per_round, adaptive)
        except ValueError as error:
            raise ConfigError("clipped_count_stddev", str(error)) from error
    return DpFedAvgConfig(
        clients_per_round=config.clients_per_round,
        sampling=config.sampling,
        l2_clip=None if config.nodp else config.l2_clip,
        noise_multiplier=noise_multiplier,
        adaptive_clipping=adaptive,
        chunk_size=config.chunk_size,
        clients_per_device_step=config.clients_per_device_step,
    )


def epsilon_with_population(
    engine: DpFedAvg, ledger: privacy.PrivacyLedger, population: int, delta: float
) -> dict[str, float | None]:
    """eps (RDP and PLD) of the ledger's rounds (each with its noise and cohort) if
    `population` users existed."""
    return {
        name: engine.epsilon_with_population(ledger, population, delta, name)
        for name in ("rdp", "pld")
    }


def new_ledger(config: FedAvgClassifierConfig, engine: DpFedAvg) -> privacy.PrivacyLedger:
    """An empty user-level ledger describing this run."""
    return engine.user_ledger(
        config.delta,
        "DP-FedAvg (per-client clipped update sum + Gaussian noise)"
        + (" with adaptive clipping (update and count queries)"
           if config.adaptive_clipping else ""),
        target_epsilon=config.target_epsilon,
        dataset=config.dataset,
        partition=config.partition,
        update_noise_multiplier=engine.aggregator.update_mechanism.noise_multiplier,
    )


def train(config: FedAvgClassifierConfig, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Trains (or resumes) a federated classifier in `workdir`; returns the summary dict.

    Writes ledger.json (private runs), metrics.jsonl, summary.json, report.md, checkpoints/
    and diagnostics.jsonl (cohort figures and each client's accuracy on its own data: not
    a release).
    """
    started = time.time()
    wd = Workdir(workdir)
    train_ds = data_lib.load(config.dataset, "train", data_dir=config.data_dir)
    test_ds = data_lib.load(config.dataset, "test", data_dir=config.data_dir)
    require(config.num_clients <= train_ds.num_examples, "num_clients",
             f"must be <= the {train_ds.num_examples} training examples")
    clients = federate(config, train_ds)
    data = TrainingData.of(clients, data_lib.source_flag(config.dataset))

    model = make_model(config, train_ds.num_classes)
    with Checkpointer(wd.file("checkpoints")) as checkpointer:
        spent = checkpointed_spend(checkpointer, wd, config, data)
        noise_multiplier = resolve_noise_multiplier(config, spent)
    init_key = seeds.stream_key(config.seed, seeds.INIT_STREAM)
    initial = jax.jit(model.init)(init_key, jnp.asarray(train_ds.images[:1]))
    canaries = draw_canaries(config, initial)
    engine = DpFedAvg(
        local.local_training(
            classifier_loss(model), optax.sgd(config.client_learning_rate),
            config.local_steps, config.local_batch_size),
        make_optimizer(config.server_optimizer, config.server_learning_rate),
        clients,
        engine_config(config, noise_multiplier),
        **engine_canaries(canaries),
    )
    state = engine.init(initial)
    ledger = None if config.nodp else new_ledger(config, engine)

    test_eval = make_evaluate(model)
    client_eval = evaluation.make_example_evaluator(example_accuracy(model), clients, engine.mesh)
    test_images, test_labels = jnp.asarray(test_ds.images), jnp.asarray(test_ds.labels)

    def evaluate(state: ServerState) -> dict:  # the released params on the public test split
        accuracy, loss = test_eval(state.params, test_images, test_labels)
        return {"test_accuracy": accuracy, "test_loss": loss}

    def diagnose(state: ServerState) -> dict:  # each client's accuracy on its own raw data
        per_client = client_eval(state.params)
        summary = evaluation.summarize(per_client, clients.counts)
        return {f"train_client_{k}": v for k, v in summary.items()}

    result = run_rounds(
        engine, state, rounds=config.rounds, seed=config.seed, workdir=wd, ledger=ledger,
        evaluate=evaluate, eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every, desc="fedavg", log=log, config=config,
        data=data, diagnose=diagnose, started=started)

    ledger_json = result.ledger.to_json() if result.ledger is not None else None
    if ledger_json is not None:
        wd.write_json(LEDGER_FILE, ledger_json)
    other = {}
    if result.ledger is not None and result.rounds_done > 0:
        other = {str(n): epsilon_with_population(engine, result.ledger, n, config.delta)
                 for n in OTHER_POPULATIONS}
    summary = {
        "test_accuracy": result.evaluation["test_accuracy"],
        "test_loss": result.evaluation["test_loss"],
        "epsilon_rdp": ledger_json["epsilon_rdp"] if ledger_json else None,
        "epsilon_pld": ledger_json["epsilon_pld"] if ledger_json else None,
        "delta": None if config.nodp else config.delta,
        "unit": "user",
        "noise_multiplier": None if config.nodp else noise_multiplier,
        "epsilon_same_noise_if_users": other,
        "steps": result.rounds_done,
        "rounds": result.rounds_done,
        "stopped_by_budget": result.last_round < config.rounds,
        "final_clip_norm": float(result.state.clip_norm),
        "params_sha256": params_sha256(result.state.params),
        "diverged": result.diverged,
        **result.clock.summary(),
        **seeds.summary_fields(config),
        "environment": environment_info(),
    }
    audit_figures = write_audit(
        wd, canaries, initial, result.state.params, ledger_json, trained=result.rounds_done > 0,
        all_rounds=functools.partial(engine.all_rounds_audit, result.state))
    if audit_figures is not None:
        summary["audit"] = audit_figures
    wd.write_summary(summary)
    wd.write_report(render_report(config, summary, wd.read_metrics()),
                    keep_evaluation=result.trained_nothing)
    return summary


def render_report(config: FedAvgClassifierConfig, summary: dict, metrics: list[dict]) -> str:
    """report.md: the key figures of a federated run."""
    if config.nodp:
        privacy_line = "non-private FedAvg (no clipping, no noise): **no privacy guarantee**"
    else:
        upper = privacy.format_upper
        other = ", ".join(f"{int(n):,} users: eps {upper(e['rdp'])} (PLD {upper(e['pld'])})"
                          for n, e in summary["epsilon_same_noise_if_users"].items())
        privacy_line = (
            f"({upper(summary['epsilon_rdp'])}, {config.delta:g})-DP by RDP "
            f"(PLD: eps = {upper(summary['epsilon_pld'])}); unit: one **user** "
            f"({config.num_clients} users); {config.sampling} sampling of "
            f"{config.clients_per_round} clients per round, noise multiplier "
            f"{summary['noise_multiplier']:.4g}, clip {config.l2_clip:g}"
            + (" (adaptive)" if config.adaptive_clipping else "")
            + f". With only {config.num_clients} users, user-level eps is large; the same "
            f"noise and cohort with more users would give {other}."
        )
    rows = "\n".join(
        f"| {m['round']} | {m['test_accuracy']:.4f} | "
        f"{m.get('clip_norm', float('nan')):.4g} | {privacy.format_upper(m.get('epsilon_rdp'))} |"
        for m in metrics
    )
    return (
        f"# DP-FedAvg classifier: {config.model} on {config.dataset}, "
        f"{config.num_clients} clients ({config.partition})\n\n"
        f"- test accuracy: **{summary['test_accuracy']:.4f}** after {summary['rounds']} rounds\n"
        f"- privacy: {privacy_line}\n"
        f"{audit.report_line(summary)}"
        f"- local: {config.local_steps} steps of batch {config.local_batch_size}, client SGD "
        f"lr {config.client_learning_rate:g}; server {config.server_optimizer} "
        f"lr {config.server_learning_rate:g}; seed {seeds.public(config)}\n"
        f"- wall time: {run_clock.describe(summary)}\n"
        f"- params sha256: `{summary['params_sha256']}`\n"
        f"{divergence.report_line(summary)}\n"
        f"{DIAGNOSTICS_NOTE}\n\n"
        "## Evaluations\n\n| round | test accuracy | clip norm | eps (RDP) |\n"
        "|---|---|---|---|\n"
        f"{rows}\n"
    )
