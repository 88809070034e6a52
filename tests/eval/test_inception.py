"""Tests for dpfed.eval.inception: the weights file checks and the JAX forward pass.

The port was checked against pytorch-fid's FID Inception (random weights, same input)
to 1e-5; `test_matches_pytorch_fid` repeats that check where torch, torchvision and
pytorch-fid are installed (they are not project dependencies).
"""

import numpy as np
import pytest

from dpfed.eval import inception
from tests.eval import inception_weights


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights.npz"
    inception_weights.write(path)
    return path


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(inception.WeightsError, match="WORKSPACE.md"):
        inception.inception_extractor(tmp_path / "absent.npz")


def test_not_an_npz_is_rejected(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_text("not numpy")
    with pytest.raises(inception.WeightsError, match="not a readable"):
        inception.load_weights(path)


def test_missing_array_is_named(tmp_path):
    state = inception_weights.random_state()
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    np.savez(tmp_path / "w.npz", **state)
    with pytest.raises(inception.WeightsError, match="Mixed_6b.branch7x7_2.conv.weight"):
        inception.load_weights(tmp_path / "w.npz")


def test_misshapen_array_is_named(tmp_path):
    state = inception_weights.random_state()
    state["Mixed_7c.branch_pool.bn.bias"] = np.zeros(7, np.float32)
    np.savez(tmp_path / "w.npz", **state)
    with pytest.raises(inception.WeightsError, match=r"Mixed_7c.branch_pool.bn.bias.*\(7,\)"):
        inception.load_weights(tmp_path / "w.npz")


def test_features_are_2048_d_and_finite(weights_file):
    extractor = inception.inception_extractor(weights_file, image_size=75)
    images = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    features = np.asarray(extractor.features(images))
    assert features.shape == (2, 2048) and np.isfinite(features).all(), features.shape
    assert extractor.metric_name == "fid_inception", extractor.metric_name


def test_matches_pytorch_fid(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytorch_fid = pytest.importorskip("pytorch_fid.inception")
    net = pytorch_fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [
        ("Mixed_5b", pytorch_fid.FIDInceptionA(192, 32)),
        ("Mixed_5c", pytorch_fid.FIDInceptionA(256, 64)),
        ("Mixed_5d", pytorch_fid.FIDInceptionA(288, 64)),
        ("Mixed_6b", pytorch_fid.FIDInceptionC(768, 128)),
        ("Mixed_6c", pytorch_fid.FIDInceptionC(768, 160)),
        ("Mixed_6d", pytorch_fid.FIDInceptionC(768, 160)),
        ("Mixed_6e", pytorch_fid.FIDInceptionC(768, 192)),
        ("Mixed_7b", pytorch_fid.FIDInceptionE_1(1280)),
        ("Mixed_7c", pytorch_fid.FIDInceptionE_2(2048)),
    ]:
        setattr(net, name, block)
    state = inception_weights.random_state(1)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    np.savez(tmp_path / "w.npz", **state)
    monkeypatch.setattr(pytorch_fid, "fid_inception_v3", lambda: net)
    reference = pytorch_fid.InceptionV3([3]).eval()
    images = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(np.repeat(images, 3, -1).transpose(0, 3, 1, 2)))
    got = inception.inception_extractor(tmp_path / "w.npz").features(images)
    np.testing.assert_allclose(
        np.asarray(got), expected[0][:, :, 0, 0].numpy(), rtol=1e-3, atol=1e-4,
        err_msg="the JAX port differs from pytorch-fid's FID Inception",
    )


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (2, 28, 28, 2)])
def test_channels_first_images_are_rejected(weights_file, shape):
    # jax.image.resize resizes every axis: [N, 1, 28, 28] became [N, 299, 299, 3] by
    # stretching H=1 and shrinking C=28, silently giving features of a smeared image.
    extractor = inception.inception_extractor(weights_file, image_size=75)
    images = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
    with pytest.raises(ValueError, match="channels last"):
        extractor.features(images)
