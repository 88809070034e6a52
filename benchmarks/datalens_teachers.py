r"""Teacher throughput of DataLens: all teachers vectorised vs a Python loop over teachers.

The public DataLens code (TensorFlow 1.14) trains teachers one at a time: for each
teacher a `sess.run` of its optimiser fed with its own minibatch, then a second run to
read its loss, with batches of teachers swapped in and out of checkpoints. The loop
here is that schedule without the checkpoint swapping (every teacher's state stays in
memory, which favours the loop): per teacher, its minibatch is fed from host memory, a
jitted single-teacher step runs, and its loss is read back. The vectorised path is
`dpfed.generative.datalens.TeacherEnsemble.train_step`: one jitted call for all T
teachers (vmap within chunks, lax.map over chunks, teacher axis sharded over the mesh).
The same holds for the vote phase (each teacher's gradient w.r.t. every generated
sample and its TopAgg vote: one per sample, or one per batch with --vote_scope=batch,
the table rows' setting).

One run, all figures measured in it (median of --repeats timed calls after a warm-up):

  .venv/bin/python -m benchmarks.datalens_teachers --num_teachers=50,200,1000

--cpu_devices=N splits the CPU into N JAX devices (as `experiments.datalens
--cpu_devices` does): the vectorised path shards the teachers over them, the loop runs
on the first device, as the public code runs on one. Compare the loop of a 1-device run
too: on 2 cores the 2-device process runs it slower than a 1-device one (WORKSPACE.md).

prints teacher-steps/s (train) and teacher-samples/s (vote phase: one teacher's gradient
on one sample, and its vote) for both paths and their ratio, the vectorised path's
GFLOP/s and the ceiling of the ratio (`benchmarks.roofline`: T x one teacher's FLOPs,
XLA's count of the loop's jitted single-teacher function, at the best float32 matmul
rate of this run, against the loop's time: the most any vectorisation could gain here).
Figures of this machine are in WORKSPACE.md.
"""

import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks import roofline
from dpfed import data
from dpfed.federated import mesh
from dpfed.generative.datalens import TeacherEnsemble, TopAgg, make_mesh, partition_teachers
from dpfed.generative.datalens.teachers import VOTE_SCOPES, generator_loss
from dpfed.models.datalens_nets import TeacherDiscriminator

_TEACHERS = flags.DEFINE_list("num_teachers", ["50", "200", "1000"], "Teacher counts T.")
_DATASET = flags.DEFINE_string("dataset", "mnist5k", "Dataset whose train split is partitioned.")
_REAL = flags.DEFINE_integer("real_batch", 16, "Real examples per teacher step (at most N/T).")
_FAKES = flags.DEFINE_integer("fake_batch", 16, "Generated samples per teacher step / vote.")
_TOPK = flags.DEFINE_integer("topk", 300, "k of the TopAgg votes.")
_CHUNK = flags.DEFINE_integer("teacher_chunk", 4, "Teachers vectorised together.")
_FEATURES = flags.DEFINE_list("teacher_features", ["8", "16"], "Teacher conv widths.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into this many JAX devices (0: JAX's default); the "
    "vectorised path shards the teachers over them, the loop runs on the first.", lower_bound=0,
)
_SCOPE = flags.DEFINE_enum(
    "vote_scope", "batch", VOTE_SCOPES, "One vote per generated sample or per batch (rows: batch)."
)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _loss(disc, params, real, real_labels, fakes, fake_labels):
    real_logits = disc.apply(params, real, real_labels)
    fake_logits = disc.apply(params, fakes, fake_labels)
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def loop_teachers(state, num_teachers: int) -> list:
    """Teacher t's slice of the stacked `state`, for the loop: on the first device only.

    A slice of the sharded state is replicated over the mesh, and a jitted step given
    replicated arguments runs on every device: with --cpu_devices=2 the loop would do each
    teacher's step twice, once per device.
    """
    first = jax.devices()[0]
    return [jax.device_put(jax.tree.map(lambda x, t=t: x[t], state), first)
            for t in range(num_teachers)]


def measure(num_teachers: int, train_ds: data.ImageDataset, repeats: int) -> dict:
    """Seconds per pass over all teachers (train step and votes), vectorised and looped,
    and XLA's FLOP count of one teacher's step and of its votes (None if not reported)."""
    disc = TeacherDiscriminator(train_ds.num_classes, tuple(int(f) for f in _FEATURES.value))
    optimizer = optax.adam(1e-3, b1=0.5)
    topagg = TopAgg(k=_TOPK.value, b=1e-4, sigma=1.0, beta=0.5)
    ensemble = TeacherEnsemble(disc, optimizer, num_teachers, _CHUNK.value, make_mesh())
    parts = partition_teachers(train_ds.images, train_ds.labels, num_teachers, 0, "balanced")
    real = min(_REAL.value, min(len(p) for p in parts))
    index = np.stack([p[:real] for p in parts])  # [T, real]
    images, labels = train_ds.images[index], train_ds.labels[index]
    key = jax.random.key(0)
    fakes = jax.random.uniform(key, (_FAKES.value, *train_ds.image_shape))
    fake_labels = jnp.arange(_FAKES.value, dtype=jnp.int32) % train_ds.num_classes

    # Vectorised: one call for all teachers.
    state = ensemble.init(key, fakes[0])
    ids = ensemble.teacher_ids()
    arrays = ensemble.shard(
        (
            jnp.asarray(ensemble.pad(images)),
            jnp.asarray(ensemble.pad(labels)),
            jnp.asarray(ensemble.pad(np.full(num_teachers, real, np.int32))),
        )
    )
    # Every array is an argument of both paths' jitted calls: closed over, it would be an
    # HLO constant, and XLA would fold what depends on constants alone (the teachers'
    # minibatches drawn with the fixed key) into the compiled step.
    train_all = jax.jit(functools.partial(ensemble.train_step, real_batch=real))
    scope = _SCOPE.value
    vote_all = jax.jit(functools.partial(ensemble.vote_sum, topagg=topagg, scope=scope))
    vmapped_train = _median_seconds(
        lambda: train_all(state, arrays, ids, fakes, fake_labels, key), repeats)
    vmapped_vote = _median_seconds(
        lambda: vote_all(state, ids, fakes, fake_labels, key), repeats)

    # Loop: one teacher at a time, its batch fed from the host, its loss read back.
    # Each step takes every array as an argument, so `roofline.cpu_flops` can count it.
    def train_step(teacher, real_images, real_labels, fakes, fake_labels):
        loss, grads = jax.value_and_grad(_loss, argnums=1)(
            disc, teacher["params"], real_images, real_labels, fakes, fake_labels
        )
        updates, opt_state = optimizer.update(grads, teacher["opt_state"], teacher["params"])
        params = optax.apply_updates(teacher["params"], updates)
        return {"params": params, "opt_state": opt_state}, loss

    def vote_step(params, t, fakes, fake_labels, key):
        grads = -jax.grad(lambda x: jnp.sum(generator_loss(disc, params, x, fake_labels)))(fakes)
        grads = grads.reshape(_FAKES.value, -1)
        teacher_key = jax.random.fold_in(key, t)
        if scope == "batch":
            return topagg.vote(grads.reshape(-1), teacher_key).reshape(grads.shape)
        keys = jax.random.split(teacher_key, _FAKES.value)
        return jax.vmap(topagg.vote)(grads, keys)

    train_one = jax.jit(train_step)
    vote_one = jax.jit(vote_step)

    teachers = loop_teachers(state, num_teachers)

    def loop_train():
        total = 0.0
        for t in range(num_teachers):
            teachers[t], loss = train_one(teachers[t], images[t], labels[t], fakes, fake_labels)
            total += float(loss)
        return total

    def loop_vote():
        total = jnp.zeros((_FAKES.value, fakes[0].size))
        for t in range(num_teachers):
            total = total + vote_one(teachers[t]["params"], t, fakes, fake_labels, key)
        return np.asarray(total)

    return {
        "T": num_teachers,
        "real": real,
        # XLA:CPU's count on any backend (XLA:GPU's leaves cuDNN calls out; `cpu_flops`).
        "train_flops": roofline.cpu_flops(
            train_step, teachers[0], images[0], labels[0], fakes, fake_labels),
        "vote_flops": roofline.cpu_flops(
            vote_step, teachers[0]["params"], 0, fakes, fake_labels, key),
        "vmapped_train": vmapped_train,
        "loop_train": _median_seconds(loop_train, repeats),
        "vmapped_vote": vmapped_vote,
        "loop_vote": _median_seconds(loop_vote, repeats),
    }


def main(argv: list[str]) -> None:
    del argv
    mesh.split_cpu(_CPU_DEVICES.value)
    train_ds = data.load(_DATASET.value, "train")
    fake = _FAKES.value
    print(
        f"DataLens teachers on {train_ds.name} ({jax.device_count()} {jax.default_backend()} "
        f"device(s)); per teacher step: <= {_REAL.value} real + {fake} generated examples; "
        f"votes ({_SCOPE.value} scope): {fake} samples, top-{_TOPK.value}; "
        f"chunk {_CHUNK.value}"
    )
    peak = roofline.matmul_flops_per_second()
    print(f"best rate (float32 matmul, this run): {peak / 1e9:.0f} GFLOP/s")
    header = (
        f"{'T':>6} {'real':>5} | {'train vmap':>12} {'train loop':>12} {'ratio':>6} "
        f"{'GFLOP/s':>8} {'ceiling':>8} | {'vote vmap':>12} {'vote loop':>12} {'ratio':>6} "
        f"{'GFLOP/s':>8} {'ceiling':>8}"
    )
    print(f"{'':13} teacher-steps/s{'':38} | teacher-samples/s (votes: one teacher, one sample)")
    print(header)
    for num_teachers in (int(t) for t in _TEACHERS.value):
        r = measure(num_teachers, train_ds, _REPEATS.value)
        t = r["T"]
        cells = [f"{t:>6} {r['real']:>5}"]
        for phase, per_pass in (("train", t), ("vote", t * fake)):
            vmapped, loop, flops = r[f"vmapped_{phase}"], r[f"loop_{phase}"], r[f"{phase}_flops"]
            rate, top = ("-", "-") if flops is None else (
                f"{t * flops / vmapped / 1e9:.1f}",
                f"{roofline.ceiling(loop, t * flops, peak):.1f}x")
            cells.append(
                f"{per_pass / vmapped:>12.1f} {per_pass / loop:>12.1f} {loop / vmapped:>5.2f}x "
                f"{rate:>8} {top:>8}")
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    app.run(main)
