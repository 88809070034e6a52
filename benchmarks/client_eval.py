r"""Per-client evaluation of a shared classifier: padded client slots vs packed examples.

Each evaluation of `experiments.fedavg_classifier` logs every client's accuracy on its own
data. `dpfed.federated.make_client_evaluator` runs the model on each client's `max_n`
padded slots (clients x max_n examples); `make_example_evaluator` runs it once per real
example, packed back to back, and sums per client. The gap grows with the largest client:
a Dirichlet label-skew split makes a few clients large.

One run, both paths timed one after the other on the same params (best of --repeats):

  .venv/bin/python -m benchmarks.client_eval --partition=iid,dirichlet

prints, per split, max_n, both times, their ratio and the largest difference of the
per-client accuracies (float rounding only). Figures of this machine are in WORKSPACE.md.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dpfed import data
from dpfed.federated import classifier, evaluation, local

_DATASET = flags.DEFINE_string("dataset", "mnist5k", "Dataset whose train split is split.")
_CLIENTS = flags.DEFINE_integer("num_clients", 100, "Clients.", lower_bound=1)
_PARTITIONS = flags.DEFINE_list(
    "partition", ["iid", "dirichlet"],
    f"Splits, as experiments.fedavg_classifier makes them: {', '.join(classifier.PARTITIONS)}.")
flags.register_validator(
    "partition", lambda names: set(names) <= set(classifier.PARTITIONS),
    f"must name splits of {classifier.PARTITIONS}")
_ALPHA = flags.DEFINE_float("dirichlet_alpha", 0.1, "Label skew of the dirichlet splits.")
_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "mlp", "logreg"], "Classifier.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed evaluations per path (best).",
                                lower_bound=1)


def over_padded_slots(example_fn: evaluation.ExampleFn) -> evaluation.MetricFn:
    """`example_fn` run on each client's padded slots and averaged over its real ones
    (masked): the padded-slot path, for `make_client_evaluator`."""

    def metric_fn(params, client_state, client, context):
        del client_state, context
        return {name: local.masked_mean(values, client.mask)
                for name, values in example_fn(params, client.arrays).items()}

    return metric_fn


def best_seconds(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` blocking calls of `fn(*args)`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str]) -> None:
    del argv
    train = data.load(_DATASET.value, "train")
    model = classifier.make_model(  # as the binary builds it (patch convolutions on CPU)
        classifier.FedAvgClassifierConfig(model=_MODEL.value, nodp=True), train.num_classes)
    params = model.init(jax.random.key(0), jnp.asarray(train.images[:1]))
    print(f"{_DATASET.value}, {_CLIENTS.value} clients, {_MODEL.value}, "
          f"{jax.device_count()} device(s), best of {_REPEATS.value}")
    print("| split | max_n | padded slots s | packed examples s | padded / packed | max diff |")
    print("|---|---|---|---|---|---|")
    for partition in _PARTITIONS.value:
        clients = classifier.federate(classifier.FedAvgClassifierConfig(
            dataset=_DATASET.value, num_clients=_CLIENTS.value, clients_per_round=1,
            partition=partition, dirichlet_alpha=_ALPHA.value, nodp=True), train)
        on_device = jax.device_put(clients)
        accuracy = classifier.example_accuracy(model)  # the same figure on both paths
        padded = evaluation.make_client_evaluator(over_padded_slots(accuracy))
        packed = evaluation.make_example_evaluator(accuracy, clients)
        a = np.asarray(padded(params, on_device)["accuracy"])  # compiles both
        b = np.asarray(packed(params)["accuracy"])
        slow = best_seconds(padded, params, on_device, repeats=_REPEATS.value)
        fast = best_seconds(packed, params, repeats=_REPEATS.value)
        print(f"| {partition} | {clients.max_n} | {slow:.3f} | {fast:.3f} | "
              f"{slow / fast:.2f}x | {np.max(np.abs(a - b)):.1g} |")


if __name__ == "__main__":
    app.run(main)
