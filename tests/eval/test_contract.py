"""Tests for dpfed.generative.contract: the Generator protocol, registry and .npz files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.generative import contract
from dpfed.train.workdir import Workdir


class ClassShadeGenerator:
    """A toy conditional generator: class c -> a constant image of brightness c / 10."""

    def sample(self, params, key, n, labels=None):
        if labels is None:
            labels = jax.random.randint(key, (n,), 0, 10)
        images = jnp.broadcast_to(labels[:, None, None, None] / 10.0, (n, 8, 8, 1))
        return images.astype(jnp.float32) * params["scale"], labels.astype(jnp.int32)


def test_sample_synthetic_asks_for_balanced_labels():
    synthetic = contract.sample_synthetic(
        ClassShadeGenerator(), {"scale": 1.0}, jax.random.key(0), 95, 10, chunk_size=20
    )
    counts = np.bincount(synthetic.labels, minlength=10)
    assert counts.max() - counts.min() <= 1, f"labels not balanced: {counts}"
    np.testing.assert_allclose(
        synthetic.images[:, 0, 0, 0], synthetic.labels / 10.0, rtol=1e-6,
        err_msg="images do not belong to their labels",
    )


def test_sample_synthetic_draws_every_sample_in_a_full_chunk():
    # A generator with batch statistics (DataLens's student) must see one batch size for
    # every sample: a leftover chunk of one would make its sample ignore the latent.
    class BatchMean:
        def __init__(self):
            self.sizes = []

        def sample(self, params, key, n, labels=None):
            self.sizes.append(n)
            z = jax.random.uniform(key, (n, 1, 1, 1))
            return z - z.mean() + 0.5, labels

    generator = BatchMean()
    synthetic = contract.sample_synthetic(generator, None, jax.random.key(0), 41, 10, 20)
    assert generator.sizes == [20, 20, 20], f"chunks must all be full: {generator.sizes}"
    assert synthetic.images.shape[0] == 41 and synthetic.labels.shape == (41,), (
        "the surplus of the last chunk must be dropped")
    np.testing.assert_array_equal(
        synthetic.labels, contract.balanced_labels(41, 10), "labels stay balanced over n")


def test_unconditional_generator_gives_no_labels():
    class Unconditional:
        def sample(self, params, key, n, labels=None):
            return jax.random.uniform(key, (n, 4, 4, 1)), None

    synthetic = contract.sample_synthetic(Unconditional(), None, jax.random.key(0), 7, 10)
    assert synthetic.labels is None and synthetic.images.shape == (7, 4, 4, 1), (
        "an unconditional generator's set should be unlabelled"
    )


@pytest.mark.parametrize("labelled", [True, False])
def test_npz_round_trip(tmp_path, labelled):
    images = np.random.default_rng(0).uniform(size=(5, 8, 8, 1)).astype(np.float32)
    labels = np.arange(5, dtype=np.int32) if labelled else None
    path = contract.save_synthetic(tmp_path / "s.npz", contract.SyntheticSet(images, labels))
    loaded = contract.load_synthetic(path)
    np.testing.assert_array_equal(loaded.images, images, err_msg="images changed on disk")
    if labelled:
        np.testing.assert_array_equal(loaded.labels, labels, err_msg="labels changed on disk")
    else:
        assert loaded.labels is None, "an unlabelled set came back labelled"


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.full((2, 4, 4, 1), 255.0)}, r"\[0, 1\]"),
        ({"images": np.full((2, 4, 4, 1), -1.0)}, r"\[0, 1\]"),  # a GAN's [-1, 1], unmapped
        ({"pixels": np.zeros((2, 4, 4, 1))}, "no 'images'"),
        ({"images": np.zeros((2, 4, 4))}, r"\[N>0, H, W, C\]"),
        ({"images": np.zeros((2, 4, 4, 1)), "labels": np.zeros(3)}, "labels must be"),
    ],
)
def test_load_rejects_contract_breaches(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        contract.load_synthetic(tmp_path / "bad.npz")


def test_registered_loader_restores_the_generator(tmp_path):
    def loader(workdir):
        return ClassShadeGenerator(), workdir.read_json("params.json")

    contract.register_generator("toy_shades", loader)
    wd = Workdir(tmp_path)
    wd.write_json("params.json", {"scale": 0.5})
    generator, params = contract.load_generator(wd, "toy_shades")
    images, _ = generator.sample(params, jax.random.key(0), 2, jnp.array([4, 8]))
    np.testing.assert_allclose(images[:, 0, 0, 0], [0.2, 0.4], err_msg="wrong params restored")


def test_unknown_method_is_a_lookup_error(tmp_path):
    with pytest.raises(LookupError, match="no_such_method"):
        contract.load_generator(Workdir(tmp_path), "no_such_method")


def test_sample_synthetic_gives_each_chunk_its_own_key():
    class Unconditional:
        def sample(self, params, key, n, labels=None):
            return jax.random.uniform(key, (n, 2, 2, 1)), None

    images = contract.sample_synthetic(Unconditional(), None, jax.random.key(0), 40, 10, 20).images
    assert not np.array_equal(images[:20], images[20:]), (
        "two chunks drew the same samples: chunk i must sample with fold_in(key, i)")
