"""Tests for dpfed.eval.domain_features: the cached fid_domain extractor."""

import json

import jax
import numpy as np
import pytest

from dpfed import data
from dpfed.eval import domain_features, fid
from dpfed.train import workdir as workdir_lib


@pytest.fixture(scope="module")
def extractor(cache_dir):
    return domain_features.domain_extractor("digits", cache_dir=cache_dir)


def test_features_are_the_penultimate_layer(extractor):
    features = np.asarray(extractor.features(data.load("digits", "test").images[:5]))
    assert features.shape == (5, domain_features.FEATURE_DIM), f"got {features.shape}"


def test_metric_is_named_fid_domain(extractor):
    assert extractor.metric_name == "fid_domain", "the domain FID must not be called FID"


def test_cache_records_the_split_it_saw(extractor, cache_dir):
    (info_file,) = (cache_dir / "domain_features").glob("digits-*.json")
    info = json.loads(info_file.read_text())
    assert info["split_seen"] == "train" and info["train_examples"] == 1438, info
    assert info["test_accuracy"] >= 0.9, f"~160 steps should train a good digits CNN: {info}"


def test_second_call_reads_the_cache(extractor, cache_dir):
    weights = next((cache_dir / "domain_features").glob("digits-*.msgpack"))
    written = weights.stat().st_mtime_ns
    again = domain_features.domain_extractor("digits", cache_dir=cache_dir)
    images = data.load("digits", "test").images[:4]
    np.testing.assert_allclose(
        again.features(images), extractor.features(images), rtol=1e-6,
        err_msg="cached extractor gives other features",
    )
    assert weights.stat().st_mtime_ns == written, "the extractor was retrained"


def test_real_images_are_far_closer_than_noise(extractor):
    train, test = data.load("digits", "train"), data.load("digits", "test")
    noise = np.random.default_rng(0).uniform(size=train.images.shape).astype(np.float32)
    real = fid.fid(extractor, test.images, train.images)
    random = fid.fid(extractor, test.images, noise)
    assert real < 0.1 * random, f"fid_domain real {real:.3f} vs noise {random:.3f}"


def test_description_names_no_cache_path_or_data_hash(extractor, cache_dir):
    assert str(cache_dir) not in extractor.description and "msgpack" not in extractor.description, (
        "the description goes into eval.json and reports: it must not carry the cache path, "
        f"which holds a hash of the private train split: {extractor.description}")


def test_the_cache_is_keyed_by_the_training_steps(tmp_path):
    images = data.load("digits", "test").images[:4]
    short, longer = (
        domain_features.domain_extractor("digits", cache_dir=tmp_path, steps=steps)
        for steps in (10, 20)
    )
    assert not np.allclose(short.features(images), longer.features(images)), (
        "an extractor cached for 10 steps was reused for 20")


def test_each_process_of_a_multi_host_job_caches_the_extractor_on_its_own_host(
        tmp_path, monkeypatch):
    # Hosts have their own caches: a host with none trains and must write it, with no
    # barrier that the hosts which read theirs would never reach (the job would hang).
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    barriers = []
    monkeypatch.setattr(workdir_lib.multihost_utils, "sync_global_devices", barriers.append)
    domain_features.domain_extractor("digits", cache_dir=tmp_path, steps=10)
    cached = sorted(p.suffix for p in (tmp_path / "domain_features").iterdir())
    assert cached == [".json", ".msgpack"], f"process 1 must cache on its host: {cached}"
    assert barriers == [], f"a host cache write waited for the other hosts: {barriers}"


@pytest.mark.parametrize("steps", [0, -5])
def test_an_untrained_extractor_is_refused(tmp_path, steps):
    # 0 steps gave the random-init CNN's features, cached and described as the metric.
    with pytest.raises(ValueError, match="steps"):
        domain_features.domain_extractor("digits", cache_dir=tmp_path, steps=steps)
    assert not list(tmp_path.rglob("*.msgpack")), "nothing is cached"
