"""T teacher discriminators as one vectorised, sharded computation (DataLens, CCS 2021).

Every teacher's params and optimiser state are stacked along a leading teacher axis,
which is sharded over the ``clients`` axis of a device mesh (`jax.shard_map`). On each
device the local teachers are processed in chunks of `chunk` teachers: `jax.vmap` over
the teachers of a chunk, `lax.map` / `lax.scan` over chunks, so memory is bounded by one
chunk whatever T is. The teacher count is padded to a multiple of devices x chunk;
padded teachers train on nothing and never vote.

Randomness is per teacher: teacher t uses `fold_in(key, t)`, so the result does not
depend on the number of devices or the chunk size (vote sums are sums of integers in
float32, hence exact in any order).
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpfed.generative.datalens.topagg import TopAgg
from dpfed.models.output import output

PyTree = Any
MESH_AXIS = "clients"
# What one teacher vote (one aggregation, one Gaussian event) covers: one generated
# sample (the paper and its public code) or a whole batch (our variant, the table rows').
VOTE_SCOPES = ("sample", "batch")


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) whose axis holds teachers."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (MESH_AXIS,))


def generator_loss(
    discriminator: nn.Module, params: PyTree, images: jax.Array, labels: jax.Array
) -> jax.Array:
    """Per-sample non-saturating generator loss softplus(-D(x, y)) = -log sigmoid(D), [B]."""
    scores: jax.Array = output(discriminator, params, images, labels)
    return jax.nn.softplus(-scores)


class TeacherEnsemble:
    """Builds the traceable functions that train the T teachers and collect their votes.

    Args:
      discriminator: the teacher module, `apply(params, images, labels) -> logits [B]`.
      optimizer: each teacher's optimiser (applied independently per teacher).
      num_teachers: T.
      chunk: teachers vectorised together (bounds memory).
      mesh: a 1-D mesh with axis ``clients``; the teacher axis is sharded over it.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        optimizer: optax.GradientTransformation,
        num_teachers: int,
        chunk: int,
        mesh: Mesh,
    ):
        if num_teachers < 1 or chunk < 1:
            raise ValueError(f"need num_teachers >= 1 and chunk >= 1, got {num_teachers}, {chunk}")
        self.discriminator = discriminator
        self.optimizer = optimizer
        self.num_teachers = num_teachers
        self.mesh = mesh
        devices = mesh.devices.size
        per_device = math.ceil(num_teachers / devices)
        self.chunk = min(chunk, per_device)
        self.padded = math.ceil(per_device / self.chunk) * self.chunk * devices
        # Built once: every init of this ensemble (each run, each resume) reuses its trace.
        self._init = jax.jit(jax.vmap(self._init_one, in_axes=(None, None, 0)),
                             out_shardings=self.sharding)

    @property
    def sharding(self) -> NamedSharding:
        """Leading (teacher) axis split over the mesh."""
        return NamedSharding(self.mesh, P(MESH_AXIS))

    def shard(self, tree: PyTree) -> PyTree:
        """Places a pytree of `[padded, ...]` arrays with the teacher axis sharded."""
        return jax.device_put(tree, self.sharding)

    def pad(self, array: np.ndarray) -> np.ndarray:
        """Pads the leading axis from T to the padded teacher count with zeros."""
        extra = self.padded - array.shape[0]
        return np.concatenate([array, np.zeros((extra, *array.shape[1:]), array.dtype)])

    def real_teachers(self, tree: PyTree) -> PyTree:
        """The first T slots of a stacked `[padded, ...]` pytree: on the mesh's first
        device (one process) or replicated over the mesh (a multi-host job: every
        process must see all of them).

        What a checkpoint holds: the padding depends on the device count and the chunk,
        the T teachers do not, so a run resumes on any mesh (`with_padding`). One copy,
        not one per device: T = 4,000 table-row teachers (507 MB) on 4 CPU devices
        peaked at 5.8 GB RSS when every device held one.
        """
        one_copy = (jax.sharding.SingleDeviceSharding(self.mesh.devices.flat[0])
                    if jax.process_count() == 1 else NamedSharding(self.mesh, P()))
        return jax.tree.map(lambda x: jax.device_put(x[: self.num_teachers], one_copy), tree)

    def with_padding(self, real: PyTree, padded: PyTree) -> PyTree:
        """`real` (`[T, ...]`, from `real_teachers` or a checkpoint) followed by
        `padded`'s padding slots, sharded: this ensemble's `[padded, ...]` layout.
        One process joins them in host memory (`real` may lie on one device)."""
        if jax.process_count() == 1:
            def join(r, p):
                return np.concatenate([np.asarray(r), np.asarray(p[self.num_teachers:])])
        else:
            def join(r, p):
                return jnp.concatenate([r, p[self.num_teachers:]])
        return self.shard(jax.tree.map(join, real, padded))

    def teacher_ids(self) -> jax.Array:
        """int32 [padded]: the global index of each slot (>= T for padding), sharded."""
        return self.shard(jnp.arange(self.padded, dtype=jnp.int32))

    def init(self, key: jax.Array, image: jax.Array) -> PyTree:
        """Stacked, sharded `{"params", "opt_state"}`; teacher t's params from fold_in(key, t)."""
        return self._init(key, image, jnp.arange(self.padded, dtype=jnp.int32))

    def _init_one(self, key: jax.Array, image: jax.Array, t: jax.Array) -> PyTree:
        label = jnp.zeros((1,), jnp.int32)
        params = self.discriminator.init(jax.random.fold_in(key, t), image[None], label)
        return {"params": params, "opt_state": self.optimizer.init(params)}

    def _map_chunks(self, fn: Callable, tree: PyTree) -> PyTree:
        """`vmap(fn)` over local teachers, in chunks (lax.map), results restacked."""
        local = jax.tree.leaves(tree)[0].shape[0]
        split = jax.tree.map(
            lambda x: x.reshape(local // self.chunk, self.chunk, *x.shape[1:]), tree
        )
        out = jax.lax.map(lambda args: jax.vmap(fn)(*args), split)
        return jax.tree.map(lambda x: x.reshape(local, *x.shape[2:]), out)

    def train_step(
        self,
        state: PyTree,
        data: tuple[jax.Array, jax.Array, jax.Array],
        ids: jax.Array,
        fakes: jax.Array,
        fake_labels: jax.Array,
        key: jax.Array,
        real_batch: int,
    ) -> tuple[PyTree, jax.Array]:
        """One discriminator step of every teacher on its own data vs the shared fakes.

        Args:
          state: stacked teacher `{"params", "opt_state"}` `[padded, ...]`.
          data: `(images [padded, max_n, H, W, C], labels [padded, max_n], counts [padded])`.
          ids: `teacher_ids()`.
          fakes, fake_labels: generated samples `[B, H, W, C]` and their labels `[B]`.
          key: teacher t draws its real minibatch with `fold_in(key, t)`.
          real_batch: real examples per teacher per step (sampled without replacement
            from its partition; the whole partition when it is smaller), at most the
            data's slots `max_n`. Every teacher's minibatch has this length: were it
            `max_n` under hash partitions, a private count (the largest partition's
            size) would shape every teacher's float reductions, and one record would
            move every teacher, not only its own.

        Returns:
          The new state and the mean discriminator loss over the T real teachers. The
          loss is a function of private data: keep it for tests, do not publish it.
        """
        images, labels, counts = data
        max_n = labels.shape[1]
        if real_batch > max_n:
            raise ValueError(f"real_batch {real_batch} exceeds the data's {max_n} slots: pad "
                             "the partitions to at least real_batch (`TeacherData`)")
        size = real_batch
        disc, opt = self.discriminator, self.optimizer

        def loss_fn(params, real, real_labels, mask, fakes, fake_labels):
            real_logits = disc.apply(params, real, real_labels)
            fake_logits = disc.apply(params, fakes, fake_labels)
            real_loss = jnp.sum(jax.nn.softplus(-real_logits) * mask) / jnp.maximum(mask.sum(), 1)
            return real_loss + jnp.mean(jax.nn.softplus(fake_logits))

        def local(state, images, labels, counts, ids, fakes, fake_labels, key):
            def one(teacher, x, y, count, t):
                scores = jax.random.uniform(jax.random.fold_in(key, t), (max_n,))
                order = jnp.argsort(scores + (jnp.arange(max_n) >= count))[:size]
                mask = (jnp.arange(size) < jnp.minimum(count, size)).astype(jnp.float32)
                loss, grads = jax.value_and_grad(loss_fn)(
                    teacher["params"], x[order], y[order], mask, fakes, fake_labels
                )
                updates, opt_state = opt.update(grads, teacher["opt_state"], teacher["params"])
                params = optax.apply_updates(teacher["params"], updates)
                return {"params": params, "opt_state": opt_state}, jnp.where(
                    t < self.num_teachers, loss, 0.0
                )

            new, losses = self._map_chunks(one, (state, images, labels, counts, ids))
            return new, jax.lax.psum(jnp.sum(losses), MESH_AXIS)

        spec = P(MESH_AXIS)
        new, loss_sum = jax.shard_map(
            local, mesh=self.mesh, in_specs=(spec,) * 5 + (P(),) * 3, out_specs=(spec, P())
        )(state, images, labels, counts, ids, fakes, fake_labels, key)
        return new, loss_sum / self.num_teachers

    def vote_sum(
        self,
        state: PyTree,
        ids: jax.Array,
        samples: jax.Array,
        labels: jax.Array,
        key: jax.Array,
        topagg: TopAgg,
        scope: str = "sample",
    ) -> jax.Array:
        """Sum over the T teachers of their TopAgg votes: `[B, D]`.

        Teacher t's gradient is -d softplus(-D_t(x, y)) / dx for each sample x (the
        direction that lowers the generator loss). With `scope="sample"` each teacher
        votes on each sample separately (k non-zeros per sample; vote on sample i uses
        `fold_in(fold_in(key, t), i)`); with `scope="batch"` it casts one vote on the
        whole batch flattened to B*D coordinates (k non-zeros in all, with
        `fold_in(key, t)`; our variant: the public code votes per sample). Not noised: feed it to
        `topagg.privatize` before anything else sees it.
        """
        if scope not in VOTE_SCOPES:
            raise ValueError(f"scope must be one of {VOTE_SCOPES}, got {scope!r}")
        disc = self.discriminator
        num_samples = samples.shape[0]

        def local(params, ids, samples, labels, key):
            # Per-device copy: inside shard_map the gradient w.r.t. a replicated input is
            # summed over the mesh, which would add up the teachers of all devices.
            samples = jax.lax.pcast(samples, (MESH_AXIS,), to="varying")

            def one(params, t):
                loss = lambda x: jnp.sum(generator_loss(disc, params, x, labels))
                grads = -jax.grad(loss)(samples).reshape(num_samples, -1)
                teacher_key = jax.random.fold_in(key, t)
                if scope == "batch":
                    votes = topagg.vote(grads.reshape(-1), teacher_key).reshape(grads.shape)
                else:
                    keys = jax.vmap(lambda i: jax.random.fold_in(teacher_key, i))(
                        jnp.arange(num_samples)
                    )
                    votes = jax.vmap(topagg.vote)(grads, keys)
                return votes * (t < self.num_teachers)

            local_count = ids.shape[0]
            split = jax.tree.map(
                lambda x: x.reshape(local_count // self.chunk, self.chunk, *x.shape[1:]),
                (params, ids),
            )

            def body(total, chunk):
                return total + jnp.sum(jax.vmap(one)(*chunk), axis=0), None

            zero = jnp.zeros((num_samples, math.prod(samples.shape[1:])), jnp.float32)
            zero = jax.lax.pcast(zero, (MESH_AXIS,), to="varying")
            total, _ = jax.lax.scan(body, zero, split)
            return jax.lax.psum(total, MESH_AXIS)

        spec = P(MESH_AXIS)
        return jax.shard_map(
            local, mesh=self.mesh, in_specs=(spec, spec, P(), P(), P()), out_specs=P()
        )(state["params"], ids, samples, labels, key)
