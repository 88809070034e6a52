"""DataLens teachers (vectorised, sharded, chunked) and training runs (ledger, guard, resume).

Tiny models on sklearn's 8x8 digits keep compilation short; the in-process runs share one
compiled DataLens (`training.build` caches it by model settings).
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import dp_event, pld, rdp

from dpfed import data as data_lib
from dpfed.federated import mesh as mesh_lib
from dpfed.generative import contract, datalens
from dpfed.generative.datalens import teachers as teachers_lib
from dpfed.models.datalens_nets import TeacherDiscriminator
from dpfed.privacy import accounting
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir
from tests import delta_warning, dispatch, other_data
from tests.killed import (
    KilledAtRelease,
    assert_ledger_json_covers_metrics,
    kill_after_metrics_record,
    kill_at_release_write,
    releases_in_ledger_json,
)

TINY = datalens.DataLensConfig(
    dataset="digits",
    num_teachers=12,
    topk=6,
    sigma=30.0,
    beta=0.3,
    vote_scope="sample",
    grad_bound=1e-3,
    z_dim=4,
    d_steps=1,
    pretrain_steps=2,
    batch_size=4,
    real_batch=4,
    teacher_features=(4,),
    generator_hidden=16,
    generator_width=4,
    teacher_chunk=2,
    steps=4,
    eval_every=2,
    checkpoint_every=2,
    num_synthetic=20,
)


def _ensemble(num_teachers, chunk, devices):
    return datalens.TeacherEnsemble(
        TeacherDiscriminator(10, (4,)),
        optax.adam(1e-2),
        num_teachers,
        chunk,
        datalens.make_mesh(devices),
    )


def _teacher_inputs(ensemble, key):
    images = jax.random.uniform(key, (ensemble.num_teachers, 5, 8, 8, 1))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (ensemble.num_teachers, 5), 0, 10)
    counts = (np.arange(ensemble.num_teachers) % 6).astype(np.int32)  # 0 (empty) to 5
    data = ensemble.shard(
        (
            jnp.asarray(ensemble.pad(np.asarray(images))),
            jnp.asarray(ensemble.pad(np.asarray(labels))),
            jnp.asarray(ensemble.pad(counts)),
        )
    )
    samples = jax.random.uniform(jax.random.fold_in(key, 2), (3, 8, 8, 1))
    sample_labels = jnp.array([0, 3, 9])
    return data, samples, sample_labels


def _run(ensemble, topagg, key, scope="sample"):
    """Init, one teacher step, then the vote sums (jitted)."""
    state = ensemble.init(jax.random.fold_in(key, 0), jnp.zeros((8, 8, 1)))
    data, samples, sample_labels = _teacher_inputs(ensemble, jax.random.fold_in(key, 1))
    ids = ensemble.teacher_ids()

    @jax.jit
    def go(state, data, ids):
        state, _ = ensemble.train_step(
            state, data, ids, samples, sample_labels, jax.random.fold_in(key, 2), real_batch=4
        )
        votes = ensemble.vote_sum(
            state, ids, samples, sample_labels, jax.random.fold_in(key, 3), topagg, scope
        )
        return state, votes

    return go(state, data, ids) + (samples, sample_labels)


TOPAGG = datalens.TopAgg(k=5, b=1e-3, sigma=1.0, beta=0.2)


def test_vote_sum_equals_a_loop_over_teachers_on_one_and_eight_devices():
    key = jax.random.key(7)
    eight_devices = _ensemble(num_teachers=13, chunk=2, devices=jax.devices())
    assert eight_devices.padded == 16  # 8 shards of 1 chunk of 2: 3 padding teachers
    one_device = _ensemble(num_teachers=13, chunk=2, devices=jax.devices()[:1])
    assert one_device.padded == 14  # 7 chunks of 2: 1 padding teacher
    state, votes, samples, labels = _run(eight_devices, TOPAGG, key)
    state_one, votes_one, _, _ = _run(one_device, TOPAGG, key)

    disc = eight_devices.discriminator
    vote_key = jax.random.fold_in(key, 3)

    @jax.jit
    def one_teacher(params, t):
        grads = -jax.grad(
            lambda x: jnp.sum(teachers_lib.generator_loss(disc, params, x, labels))
        )(samples).reshape(3, -1)
        keys = [jax.random.fold_in(jax.random.fold_in(vote_key, t), i) for i in range(3)]
        return jnp.stack([TOPAGG.vote(g, k) for g, k in zip(grads, keys, strict=True)])

    expected = sum(
        one_teacher(jax.tree.map(lambda x, t=t: x[t], state["params"]), t) for t in range(13)
    )  # the 13 real teachers only: padding teachers must not vote
    np.testing.assert_array_equal(np.asarray(votes), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(votes_one), np.asarray(votes))
    for a, b in zip(jax.tree.leaves(state_one), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(np.asarray(a)[:13], np.asarray(b)[:13], rtol=1e-5, atol=1e-6)


def test_each_teacher_trains_on_its_own_partition_only():
    # Changing partition 2's images must move teacher 2 and no other: a teacher that saw
    # another's partition would let one record change two votes (sensitivity sqrt(4k) no
    # longer bounds the vote sum).
    ensemble = _ensemble(num_teachers=4, chunk=2, devices=jax.devices()[:1])
    key = jax.random.key(5)
    state = ensemble.init(jax.random.fold_in(key, 0), jnp.zeros((8, 8, 1)))
    images = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (4, 5, 8, 8, 1)))
    labels = np.asarray(jax.random.randint(jax.random.fold_in(key, 2), (4, 5), 0, 10))
    counts = np.full(4, 5, np.int32)
    changed = images.copy()
    changed[2] = 1.0 - changed[2]
    fakes = jax.random.uniform(jax.random.fold_in(key, 3), (3, 8, 8, 1))
    fake_labels = jnp.array([0, 3, 9])

    train_step = jax.jit(functools.partial(ensemble.train_step, real_batch=4))  # 1 compile

    def step(images):
        data = ensemble.shard(tuple(jnp.asarray(ensemble.pad(a)) for a in (images, labels, counts)))
        new, _ = train_step(state, data, ensemble.teacher_ids(), fakes, fake_labels,
                            jax.random.fold_in(key, 4))
        return new["params"]

    a, b = step(images), step(changed)
    moved = [t for t in range(4) if any(
        not np.array_equal(np.asarray(x)[t], np.asarray(y)[t])
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))]
    assert moved == [2], f"partition 2 changed, teachers {moved} moved: only teacher 2 may"


def test_one_record_of_the_largest_hash_partition_moves_only_its_teacher():
    # Under hash partitions the largest partition's size counts private records. It set
    # the teachers' slots, and with a real batch covering it every teacher's minibatch
    # length: one record more or less rounded every teacher's loss differently.
    train = data_lib.load("digits", "train")
    config = dataclasses.replace(TINY, num_teachers=4, real_batch=600, partition="hash")
    ensemble = _ensemble(num_teachers=4, chunk=2, devices=jax.devices()[:1])
    full = datalens.training.TeacherData(train, config, ensemble)
    counts = np.asarray(full.arrays[2])[:4]
    largest = int(np.argmax(counts))
    parts = datalens.partition_teachers(train.images, train.labels, 4, config.seed, "hash")
    keep = np.setdiff1d(np.arange(train.num_examples), parts[largest][-1:])
    smaller = datalens.training.TeacherData(
        dataclasses.replace(train, images=train.images[keep], labels=train.labels[keep]),
        config, ensemble)
    assert full.max_n == smaller.max_n == 600, (
        f"slots {full.max_n} / {smaller.max_n}: they must be real_batch, not a private count")
    key = jax.random.key(5)
    state = ensemble.init(jax.random.fold_in(key, 0), jnp.zeros((8, 8, 1)))
    fakes = jax.random.uniform(jax.random.fold_in(key, 3), (3, 8, 8, 1))

    train_step = jax.jit(functools.partial(ensemble.train_step, real_batch=config.real_batch))

    def step(teacher_data):
        new, _ = train_step(state, teacher_data.arrays, ensemble.teacher_ids(), fakes,
                            jnp.array([0, 3, 9]), jax.random.fold_in(key, 4))
        return new["params"]

    a, b = step(full), step(smaller)
    moved = [t for t in range(4) if any(
        not np.array_equal(np.asarray(x)[t], np.asarray(y)[t])
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))]
    assert set(moved) <= {largest}, f"one record of teacher {largest} moved teachers {moved}"


def test_a_run_gives_its_teachers_minibatches_of_real_batch_not_of_the_largest_partition(
        tmp_path, monkeypatch):
    # The test above checks the ensemble given real_batch; this is what a run gives it.
    # Under hash partitions the slots hold the largest partition, a private count: as the
    # minibatch length, one record would move every teacher.
    given = []

    class GivenError(Exception):
        pass

    def train_step(self, state, data, ids, key, num_d_steps, real_batch, audited=None):
        given.append(real_batch)
        raise GivenError  # before any step is compiled

    monkeypatch.setattr(datalens.training.DataLens, "train_step", train_step)
    with pytest.raises(GivenError):
        datalens.train(TINY, str(tmp_path), log=lambda _: None)
    assert given == [TINY.real_batch], (
        f"hash partitions: every teacher's minibatch must be real_batch long, got {given}")


def test_whole_partitions_under_hash_partitions_are_refused():
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(TINY, real_batch=None, partition="hash")
    assert error.value.field == "real_batch", error.value.field
    dataclasses.replace(TINY, real_batch=None, partition="balanced")  # public sizes: fine


def test_real_teachers_move_between_meshes_of_other_padding():
    eight_devices = _ensemble(num_teachers=13, chunk=2, devices=jax.devices())  # padded 16
    one_device = _ensemble(num_teachers=13, chunk=2, devices=jax.devices()[:1])  # padded 14
    state = eight_devices.init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    fresh = one_device.init(jax.random.key(1), jnp.zeros((8, 8, 1)))
    saved = jax.device_get(eight_devices.real_teachers(state))  # a checkpoint, on the host
    moved = one_device.with_padding(saved, fresh)
    for a, b, f in zip(*map(jax.tree.leaves, (moved, state, fresh)), strict=True):
        assert a.shape == f.shape and a.sharding == f.sharding, "the new mesh's layout"
        np.testing.assert_array_equal(np.asarray(a)[:13], np.asarray(b)[:13])
        np.testing.assert_array_equal(np.asarray(a)[13:], np.asarray(f)[13:])


def test_real_teachers_of_one_process_are_one_copy_not_one_per_device():
    # A checkpoint's copy of the T teachers on every device multiplied their memory by
    # the device count (T = 4,000 on 4 CPU devices: 5.8 GB RSS, 4.1 GB with one copy).
    ensemble = _ensemble(num_teachers=13, chunk=2, devices=jax.devices())  # 8 devices
    state = ensemble.init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    real = ensemble.real_teachers(state)
    for leaf in jax.tree.leaves(real):
        assert leaf.shape[0] == 13, "the T real teachers, without padding"
        assert len(leaf.sharding.device_set) == 1, (
            f"the checkpoint copy lies on {len(leaf.sharding.device_set)} devices, not one")
    joined = ensemble.with_padding(real, state)  # a fresh start joins it back
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(state), strict=True):
        assert a.sharding == b.sharding, "with_padding must give the mesh's layout back"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batch_scope_is_one_k_sparse_vote_per_teacher_on_the_whole_batch():
    key = jax.random.key(3)
    ensemble = _ensemble(num_teachers=5, chunk=1, devices=jax.devices()[:1])
    state, votes, samples, labels = _run(ensemble, TOPAGG, key, scope="batch")
    disc = ensemble.discriminator
    vote_key = jax.random.fold_in(key, 3)

    @jax.jit  # one compile for the 5 teachers
    def one_teacher(params, t):
        grads = -jax.grad(
            lambda x: jnp.sum(teachers_lib.generator_loss(disc, params, x, labels))
        )(samples)
        return TOPAGG.vote(grads.reshape(-1), jax.random.fold_in(vote_key, t))

    per_teacher = []
    for t in range(5):
        vote = one_teacher(jax.tree.map(lambda x, t=t: x[t], state["params"]), t)
        assert int(jnp.sum(vote != 0)) == TOPAGG.k, "a batch vote must have k non-zeros in all"
        per_teacher.append(vote.reshape(3, -1))
    np.testing.assert_array_equal(
        np.asarray(votes),
        np.asarray(sum(per_teacher)),
        err_msg="batch scope: each teacher's one vote over the flattened batch, summed",
    )
    assert float(jnp.sum(jnp.abs(votes))) <= 5 * TOPAGG.k  # vs 3 * 5 * k with sample scope
    with pytest.raises(ValueError, match="scope"):
        _run(ensemble, TOPAGG, key, scope="pixel")


@pytest.mark.parametrize("num_teachers,chunk", [(0, 2), (-1, 2), (3, 0)])
def test_ensemble_without_a_teacher_or_with_an_empty_chunk_is_refused(num_teachers, chunk):
    # Unchecked, a 0 ends in a ZeroDivisionError while sizing the padded teacher axis,
    # and -1 teachers silently build an ensemble with a padded axis of -1.
    with pytest.raises(ValueError, match="need num_teachers >= 1 and chunk >= 1") as error:
        _ensemble(num_teachers, chunk, devices=jax.devices()[:1])
    assert f"got {num_teachers}, {chunk}" in str(error.value), (
        f"the refusal must name the values given: {error.value}")


def test_teacher_axis_is_sharded_over_the_mesh():
    ensemble = _ensemble(20, 2, jax.devices())
    state = ensemble.init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    leaf = jax.tree.leaves(state)[0]
    assert leaf.shape[0] == ensemble.padded == 32
    assert len(leaf.sharding.device_set) == len(jax.devices())
    assert leaf.addressable_shards[0].data.shape[0] == 32 // len(jax.devices())


@pytest.mark.parametrize(
    "project,loss",
    [
        (False, 16.0),  # targets 1.5 and 0.5: every pixel pulled 0.5 away from white
        (True, 8.0),  # clip(1.5) = 1 leaves the up pixels; 0.5 is in [0, 1]: left alone
    ],
    ids=["unprojected", "projected"],
)
def test_project_target_clips_the_student_target_to_the_image_range(monkeypatch, project, loss):
    # A generator saturated at white (hard sigmoid of bias 10 + O(1) is exactly 1) and an
    # aggregate of +1 on the first 32 of each sample's 64 pixels, -1 on the other 32: the
    # target is 1 + 0.5 * vote, clipped to [0, 1] with project_target, and the reported
    # loss is sum ||target - G(z)||^2 / batch size, here the 64 pixels' (target - 1)^2.
    # (Both directions in one aggregate: one compiled generator step per setting, where
    # an up case and a down case with project_target compiled it once each.)
    def up_then_down(self, noisy, t):
        half = noisy.shape[-1] // 2
        return jnp.broadcast_to(jnp.where(jnp.arange(noisy.shape[-1]) < half, 1.0, -1.0),
                                noisy.shape)

    monkeypatch.setattr(datalens.TopAgg, "threshold", up_then_down)
    config = dataclasses.replace(
        TINY, generator_output="hard_sigmoid", generator_output_bias=10.0, step_size=0.5,
        project_target=project)
    lens = datalens.DataLens(config, 10, (8, 8, 1), mesh=datalens.make_mesh(jax.devices()[:1]))
    state = lens.init(jax.random.key(0))
    white, _ = lens.generator.sample(state["generator"]["params"], jax.random.key(1), 4)
    assert np.all(np.asarray(white) == 1.0), "the set-up needs a generator saturated at white"
    _, metrics = lens.generator_step(state, lens.ensemble.teacher_ids(), jax.random.key(2))
    assert float(metrics["generator_loss"]) == pytest.approx(loss, abs=1e-6), (
        f"project_target={project}, aggregate +1 on 32 and -1 on 32 white pixels, step 0.5: "
        f"the loss {float(metrics['generator_loss'])} must be the sum of (clipped target - "
        f"1)^2 = {loss}")


def test_the_generator_step_thresholds_the_noised_vote_sum_and_nothing_else(monkeypatch):
    # Thresholding is free only as post-processing of the release: fed the vote sum before
    # its noise, the step would release the votes themselves. The other tests replace the
    # threshold or read the vote sums, so this traces the step (no compile) to see what
    # the threshold is given.
    released, thresholded = [], []
    privatize, threshold = datalens.TopAgg.privatize, datalens.TopAgg.threshold

    def noise(self, vote_sum, key):
        released.append(privatize(self, vote_sum, key))
        return released[-1]

    def cut(self, noisy, num_teachers):
        thresholded.append(noisy)
        return threshold(self, noisy, num_teachers)

    monkeypatch.setattr(datalens.TopAgg, "privatize", noise)
    monkeypatch.setattr(datalens.TopAgg, "threshold", cut)
    lens = datalens.DataLens(TINY, 10, (8, 8, 1), mesh=datalens.make_mesh(jax.devices()[:1]))
    state = jax.eval_shape(lens.init, jax.random.key(0))
    jax.eval_shape(lens.generator_step, state, lens.ensemble.teacher_ids(), jax.random.key(2))
    assert len(released) == len(thresholded) == 1, (len(released), len(thresholded))
    assert thresholded[0] is released[0], "the threshold must be given the noised vote sum"


@pytest.mark.parametrize("delta,warns", [(1 / 1438, True), (1e-5, False)])
def test_a_delta_of_at_least_one_over_n_is_warned_about(
    tmp_path, monkeypatch, caplog, delta, warns
):
    # delta >= 1/N admits a mechanism that releases one of the N records in the clear.
    monkeypatch.setattr("dpfed.generative.datalens.training.build", delta_warning.stop)
    delta_warning.assert_warns_of_delta(  # digits: N = 1438 training examples
        caplog, lambda: _train(tmp_path, "run", delta=delta), delta, warns, 1438, "example")


def _train(tmp_path, name, **changes):
    config = dataclasses.replace(TINY, **changes)
    return datalens.train(config, str(tmp_path / name), log=lambda _: None), tmp_path / name


def test_on_several_cpu_devices_each_jitted_step_waits_for_the_previous_one(
    tmp_path, monkeypatch
):
    # XLA:CPU deadlocks (a device never joins an all-reduce) when the host queues steps
    # ahead of its devices; the tests run on 8 CPU devices.
    digits = data_lib.load(TINY.dataset, "train")
    lens = datalens.training.build(TINY, digits.num_classes, digits.image_shape)  # train's
    ready = []
    for name in ("teacher_step", "generator_step"):
        monkeypatch.setattr(lens, name, dispatch.watch(
            getattr(lens, name), ready, lambda s: {**s, "step": dispatch.slow_identity(s["step"])}
        ))
    _train(tmp_path, "run")
    calls = TINY.pretrain_steps + 1 + (TINY.steps - 1) * (TINY.d_steps + 1)
    assert ready == [True] * calls, f"a jitted step started before the last was done: {ready}"


def test_on_one_device_the_loop_queues_steps_ahead_of_the_device(tmp_path, monkeypatch):
    # One device or an accelerator: between progress lines, evaluations and checkpoints the
    # host must not wait for a step (a per-step read of a result idles the accelerator).
    monkeypatch.setattr(mesh_lib, "waits_for_each_step", lambda: False)
    monkeypatch.setattr(datalens.training, "make_mesh", lambda: teachers_lib.make_mesh(
        jax.devices()[:1]))
    monkeypatch.setattr(datalens.training, "Progress", functools.partial(
        datalens.training.Progress, every_seconds=math.inf))  # lines at steps 1 and 4 only
    digits = data_lib.load(TINY.dataset, "train")
    lens = datalens.training.build(TINY, digits.num_classes, digits.image_shape)  # train's
    train_step, ready = lens.train_step, []

    def slowed(state, *args, **kwargs):  # the step's state and metrics finish ~0.1 s late
        ready.append(dispatch.all_ready(state))
        state, metrics = train_step(state, *args, **kwargs)
        late = dispatch.slow_identity(state["step"])
        return {**state, "step": late}, {k: v + 0 * late for k, v in metrics.items()}

    monkeypatch.setattr(lens, "train_step", slowed)
    _train(tmp_path, "run")
    # Step 1's line and step 2's checkpoint wait; nothing waits for step 3 before step 4.
    assert ready == [True, True, True, False], (
        f"whether each step's input state was computed at dispatch: {ready}; the host "
        "waited for step 3 though no line, evaluation or checkpoint was due")


def test_progress_lines_wait_for_the_step_they_report(tmp_path, monkeypatch):
    # A line that did not wait for its step would count steps that are only queued.
    seen = dispatch.record_progress_waits(
        monkeypatch, datalens.training, lambda state: state["step"])
    _train(tmp_path, "run")
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)], (
        f"(line's step, state it waits for): {seen}; each line must wait for its step")


def _direct_epsilon(noise_multiplier, count, delta):
    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(noise_multiplier), count)
    )
    return accountant.get_epsilon(delta)


def test_ledger_eps_equals_dp_accounting_and_resume_replays_the_run(tmp_path):
    whole, whole_dir = _train(tmp_path, "whole")
    ledger = json.loads((whole_dir / "ledger.json").read_text())
    z = TINY.sigma / math.sqrt(4 * TINY.topk)
    aggregations = TINY.steps * TINY.batch_size
    assert ledger["epsilon_rdp"] == pytest.approx(_direct_epsilon(z, aggregations, 1e-5), 1e-9)
    assert ledger["unit"] == "example" and ledger["neighboring_relation"] == "add_or_remove_one"
    assert ledger["num_releases"] == aggregations == whole["aggregations"]
    assert ledger["metadata"]["mechanism"].endswith("one Gaussian event per aggregated sample"), (
        f"the ledger must describe per-sample votes: {ledger['metadata']['mechanism']}")
    for name in ("metrics.jsonl", "summary.json", "report.md", "samples.png", "synthetic.npz"):
        assert (whole_dir / name).exists(), name
    for key in ("epsilon_rdp", "epsilon_pld", "delta", "steps", "params_sha256", "wall_seconds"):
        assert key in whole, key
    assert whole["diverged"] is False, "a sane run is not flagged as diverged"

    _train(tmp_path, "resumed", steps=2)  # an interrupted run: checkpoint at step 2
    resumed, resumed_dir = _train(tmp_path, "resumed")
    assert resumed["params_sha256"] == whole["params_sha256"]
    assert json.loads((resumed_dir / "ledger.json").read_text())["events"] == ledger["events"]
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").open()]
    assert steps == [2, 4]
    checkpoints = Checkpointer(resumed_dir / "checkpoints")
    assert checkpoints.restore_extra(4)["metrics_records"] == 2, (
        "the checkpoint counts the records logged before it (a resume tells removed ones)")

    generator, params = contract.load_generator(Workdir(whole_dir), datalens.METHOD)
    images, labels = generator.sample(params, jax.random.key(0), 6, jnp.arange(6))
    assert images.shape == (6, 8, 8, 1) and 0 <= float(images.min()) <= float(images.max()) <= 1
    np.testing.assert_array_equal(np.asarray(labels), np.arange(6))


def test_a_kill_while_writing_the_generator_leaves_a_ledger_of_every_step(
    tmp_path, monkeypatch
):
    kill_at_release_write(monkeypatch)
    with pytest.raises(KilledAtRelease):
        _train(tmp_path, "killed", vote_scope="batch")
    assert releases_in_ledger_json(tmp_path / "killed") == TINY.steps, (
        "the generator was written before ledger.json held its steps' aggregations")


def test_a_kill_after_a_logged_step_leaves_a_ledger_json_that_counts_it(
    tmp_path, monkeypatch
):
    # Before, ledger.json was written at the run's end only.
    kill_after_metrics_record(monkeypatch, "step", 3)
    with pytest.raises(KilledAtRelease):
        _train(tmp_path, "killed", vote_scope="batch", eval_every=1)
    assert_ledger_json_covers_metrics(tmp_path / "killed", "epsilon_rdp")


def test_batch_scope_records_one_event_per_step(tmp_path):
    summary, run_dir = _train(tmp_path, "batch", vote_scope="batch")
    ledger = json.loads((run_dir / "ledger.json").read_text())
    z = TINY.sigma / math.sqrt(4 * TINY.topk)
    assert ledger["num_releases"] == TINY.steps == summary["aggregations"], (
        "batch scope: one Gaussian aggregation per generator step, whatever batch_size"
    )
    assert ledger["epsilon_rdp"] == pytest.approx(_direct_epsilon(z, TINY.steps, 1e-5), 1e-9)
    assert ledger["metadata"]["vote_scope"] == "batch"
    assert ledger["metadata"]["aggregations_per_step"] == 1
    assert ledger["metadata"]["mechanism"].endswith("one Gaussian event per aggregated batch"), (
        f"the ledger must describe batch-scope votes: {ledger['metadata']['mechanism']}")


def test_balanced_partition_run_is_accounted_under_replace_one_as_the_same_gaussians(tmp_path):
    # The balanced scheme is sound under replace-one only; its votes are the same Gaussian
    # mechanism, so both accountants must give the eps of add/remove-one's reading of z
    # (the PLD one reported 22.6 for a mechanism of eps 9.3 before 2026-12-01).
    summary, run_dir = _train(tmp_path, "balanced", partition="balanced", steps=2)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    z = TINY.sigma / math.sqrt(4 * TINY.topk)
    aggregations = 2 * TINY.batch_size
    composed = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), aggregations)
    pld_accountant = pld.PLDAccountant(  # on the grid dpfed uses (`pld_interval`)
        value_discretization_interval=accounting.pld_interval(ledger["epsilon_rdp"]))
    pld_accountant.compose(composed)
    assert ledger["neighboring_relation"] == summary["neighboring_relation"] == "replace_one"
    assert ledger["epsilon_rdp"] == pytest.approx(_direct_epsilon(z, aggregations, 1e-5), 1e-9)
    assert ledger["epsilon_pld"] == pytest.approx(pld_accountant.get_epsilon(1e-5), 1e-6), (
        "PLD under replace-one must read z against the same sensitivity as add/remove-one")
    n = data_lib.load(TINY.dataset, "train").num_examples
    sizes = f"{n // TINY.num_teachers}-{-(-n // TINY.num_teachers)} examples each"
    assert sizes in (run_dir / "report.md").read_text(), (
        f"the report must publish the balanced sizes ({sizes}), a function of N and T alone")


def test_resume_with_another_vote_scope_is_refused(tmp_path):
    _train(tmp_path, "run", steps=2)  # a checkpoint at step 2, per-sample votes
    with pytest.raises(datalens.ConfigError) as error:
        _train(tmp_path, "run", vote_scope="batch")
    assert error.value.field == "vote_scope", "a changed setting must not continue the run"


def test_a_resume_on_other_training_data_is_refused_naming_the_flag(tmp_path, monkeypatch):
    # The digest is of the T real teachers' partitions (before the mesh pads the teacher
    # axis): digits one example short must not continue the checkpoint of step 2.
    _train(tmp_path, "run", steps=2)
    other_data.assert_resume_on_other_data_is_refused(  # digits is embedded: --dataset
        monkeypatch, lambda: _train(tmp_path, "run"), tmp_path / "run", "dataset")


def test_budget_guard_stops_before_the_target(tmp_path):
    z = TINY.sigma / math.sqrt(4 * TINY.topk)
    target = _direct_epsilon(z, 3 * TINY.batch_size, 1e-5) + 1e-6  # exactly 3 steps affordable
    summary, _ = _train(tmp_path, "guard", steps=50, target_epsilon=target)
    assert summary["steps"] == 3 and summary["stopped_by_budget"]
    assert summary["epsilon_rdp"] <= target


def test_resume_honours_a_lowered_target(tmp_path):
    z = TINY.sigma / math.sqrt(4 * TINY.topk)
    five = _direct_epsilon(z, 5 * TINY.batch_size, 1e-5) + 1e-6
    three = _direct_epsilon(z, 3 * TINY.batch_size, 1e-5) + 1e-6
    _train(tmp_path, "run", steps=2, target_epsilon=five)  # interrupted at step 2
    summary, _ = _train(tmp_path, "run", steps=50, target_epsilon=three)
    assert summary["steps"] == 3 and summary["epsilon_rdp"] <= three, (
        f"resumed under target {three:.3f}, the run spent {summary['epsilon_rdp']:.3f} in "
        f"{summary['steps']} steps: the checkpoint's old target must not be used"
    )


def test_budget_guard_with_batch_scope_counts_steps(tmp_path):
    z = TINY.sigma / math.sqrt(4 * TINY.topk)
    target = _direct_epsilon(z, 5, 1e-5) + 1e-6  # five batch aggregations affordable
    summary, _ = _train(
        tmp_path, "guard_batch", steps=50, target_epsilon=target, vote_scope="batch"
    )
    assert summary["steps"] == 5 and summary["stopped_by_budget"]


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(num_teachers=5000), "num_teachers"),
        (dict(target_epsilon=1e-3), "target_epsilon"),
        (dict(topk=100), "topk"),
        (dict(topk=300, vote_scope="batch"), "topk"),  # > 4 samples x 64 pixels
        (dict(vote_scope="pixel"), "vote_scope"),
        (dict(batch_size=1), "batch_size"),
        (dict(generator_output="tanh"), "generator_output"),
    ],
)
def test_unusable_settings_name_the_field(tmp_path, changes, field):
    with pytest.raises(datalens.ConfigError) as error:
        _train(tmp_path, "bad", **changes)
    assert error.value.field == field


def test_a_diverged_generator_still_writes_its_ledger_summary_and_report(
    tmp_path, monkeypatch
):
    # A NaN student generator (as lr 1e38 makes it); before, its NaN samples broke the
    # synthetic set's contract in save_synthetic: a traceback, and no ledger, summary or
    # report. The NaNs come from a wrapped step of TINY's compiled DataLens: a config of
    # its own (lr 1e38) compiled the whole DataLens again, ~10 s.
    digits = data_lib.load(TINY.dataset, "train")
    lens = datalens.training.build(TINY, digits.num_classes, digits.image_shape)  # train's
    generator_step = lens.generator_step

    def diverging(state, *args):
        state, metrics = generator_step(state, *args)
        gen = state["generator"]
        nan = jax.tree.map(lambda p: p * jnp.nan, gen["params"])
        return {**state, "generator": {**gen, "params": nan}}, metrics

    monkeypatch.setattr(lens, "generator_step", diverging)
    messages = []
    config = dataclasses.replace(TINY, steps=2, eval_every=1)
    (tmp_path / "synthetic.npz").write_bytes(b"an earlier generator's samples")
    summary = datalens.train(config, str(tmp_path), log=messages.append)
    assert summary["diverged"] is True, "NaN generator params must be flagged"
    for name in ("ledger.json", "summary.json", "report.md", "generator.msgpack"):
        assert (tmp_path / name).exists(), f"{name} must be written by a diverged run"
    assert not (tmp_path / "synthetic.npz").exists(), (
        "NaN samples are no synthetic set, and an earlier one would be stale")
    assert any("no synthetic.npz" in m for m in messages), messages
