"""Tests for dpfed.train.config: config errors name the field to fix."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.federated.aggregation import AdaptiveClipping, PrivateAggregator
from dpfed.federated.classifier import FedAvgClassifierConfig
from dpfed.federated.dp_fedavg import DpFedAvgConfig
from dpfed.generative import dpd_fvae, fedgan, fedgan_debug, fedlm, fedlm_debug, wgan_gp
from dpfed.generative.datalens.topagg import TopAgg
from dpfed.generative.datalens.training import DataLensConfig
from dpfed.models.lstm_lm import LstmLM
from dpfed.train.config import (
    ConfigError,
    require,
    require_finite_floats,
    require_no_privacy_settings,
    unused_privacy_flags,
)
from dpfed.train.dpsgd import DpSgdConfig


def test_require_raises_naming_the_field():
    with pytest.raises(ConfigError) as error:
        require(False, "l2_clip", "must be > 0")
    assert (error.value.field, error.value.message) == ("l2_clip", "must be > 0"), vars(error.value)


@pytest.mark.parametrize(
    "noise, target, field",
    [
        (1.0, None, "noise_multiplier"),
        (None, 1.0, "target_epsilon"),
        (0.0, None, "noise_multiplier"),
        (1.0, 2.0, "noise_multiplier"),
    ],
)
def test_a_non_private_run_refuses_noise_and_targets(noise, target, field):
    with pytest.raises(ConfigError) as error:
        require_no_privacy_settings(True, "--nodp", noise, target)
    assert error.value.field == field, f"z {noise}, target {target}: should name {field}"
    assert "--nodp" in error.value.message, f"the message names the mode: {error.value.message}"


@pytest.mark.parametrize("nonprivate, noise, target", [
    (True, None, None), (False, 1.0, None), (False, None, 1.0), (False, 1.0, 2.0)])
def test_settings_that_agree_with_the_mode_pass(nonprivate, noise, target):
    require_no_privacy_settings(nonprivate, "--nodp", noise, target)  # Must not raise.


def test_the_error_text_names_the_field():
    # Raised outside a binary (a notebook's config, a traceback), the text is all one sees.
    assert str(ConfigError("l2_clip", "must be > 0")) == "l2_clip: must be > 0", (
        "str(ConfigError) must name the field before the message")


@dataclasses.dataclass
class _Settings:
    rate: float = 0.1
    widths: tuple[float, ...] = (1.0, 2.0)
    steps: int = 3
    target: float | None = None


@pytest.mark.parametrize(
    "bad", [math.inf, -math.inf, math.nan, np.float32("inf"), np.array(math.nan),
            jnp.float32(math.inf)],
    ids=["inf", "-inf", "nan", "np.float32 inf", "0-d numpy nan", "0-d jax inf"])
@pytest.mark.parametrize("field", ["rate", "widths"])
def test_require_finite_floats_refuses_inf_and_nan(bad, field):
    value = (1.0, bad) if field == "widths" else bad
    with pytest.raises(ConfigError) as error:
        require_finite_floats(_Settings(**{field: value}))
    assert error.value.field == field, f"{field}={value}: the error should name {field}"
    assert error.value.message == f"must be a finite number, not {bad}", error.value.message


def test_require_finite_floats_passes_finite_ints_and_none():
    require_finite_floats(_Settings(rate=1e300, widths=(0.0, -1.0), steps=2**70, target=None))
    require_finite_floats(_Settings(rate=jnp.float32(0.5), widths=(np.array(2.0),),
                                    steps=np.int64(3)))  # finite 0-d arrays pass too


_LSTM = LstmLM(vocab_size=10, embed_dim=4, hidden=8, num_layers=1)


# Every config a user builds, with one of its float fields; `require_finite_floats` runs
# first in each `__post_init__`, so a notebook's config fails as the binaries' flags do.
_CONFIGS = [
    (DpSgdConfig, {}, "learning_rate"),
    (FedAvgClassifierConfig, {}, "client_learning_rate"),
    (DpFedAvgConfig, {"clients_per_round": 10}, "noise_multiplier"),
    (AdaptiveClipping, {}, "target_quantile"),
    (PrivateAggregator, {"noise_multiplier": 1.0}, "expected_clients"),
    (fedgan.FedGanConfig, {}, "delta"),
    (fedgan_debug.DebugConfig, {}, "server_g_learning_rate"),
    (wgan_gp.WganGpConfig, {}, "gp_weight"),
    (fedlm.LocalTrainingConfig, {"model": _LSTM}, "learning_rate"),
    (fedlm.FedLmConfig, {"local": fedlm.LocalTrainingConfig(_LSTM)}, "l2_clip"),
    (fedlm_debug.TextDebugConfig, {}, "client_learning_rate"),
    (dpd_fvae.DpdFvaeConfig, {}, "beta"),
    (DataLensConfig, {}, "step_size"),
    (TopAgg, {"k": 3, "b": 1.0, "beta": 0.5}, "sigma"),
]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("config, kwargs, field", _CONFIGS, ids=[c[0].__name__ for c in _CONFIGS])
def test_every_config_refuses_a_non_finite_float(config, kwargs, field, bad):
    with pytest.raises(ConfigError) as error:
        config(**kwargs, **{field: bad})
    assert error.value.field == field, (
        f"{config.__name__}({field}={bad}) should name {field}, not {error.value.field}")


# The configs with a --data_dir: `dpfed.data.load` ignores it for an embedded dataset.
_DATA_DIR_CONFIGS = [
    (DpSgdConfig, {}),
    (FedAvgClassifierConfig, {"nodp": True}),
    (dpd_fvae.DpdFvaeConfig, {}),
    (DataLensConfig, {}),
]


@pytest.mark.parametrize(("config", "kwargs"), _DATA_DIR_CONFIGS,
                         ids=[c.__name__ for c, _ in _DATA_DIR_CONFIGS])
@pytest.mark.parametrize("dataset", ["mnist5k", "digits"])
def test_a_data_dir_is_refused_for_an_embedded_dataset_alone(config, kwargs, dataset):
    # It was silently ignored: a user who meant their own copy in it trained on ours.
    with pytest.raises(ConfigError) as error:
        config(dataset=dataset, data_dir="/data/tfds", **kwargs)
    assert error.value.field == "data_dir" and dataset in error.value.message, (
        f"{config.__name__} must name --data_dir and the embedded --dataset: {error.value}")
    config(dataset="mnist", data_dir="/data/tfds", **kwargs)  # Must not raise: tfds reads it.
    config(dataset=dataset, data_dir=None, **kwargs)  # Must not raise.


@pytest.mark.parametrize("nonprivate", [True, False])
def test_unused_privacy_flags_marks_each_flag_ignored_exactly_in_a_nonprivate_run(nonprivate):
    table = unused_privacy_flags(nonprivate, "--nodp", ("clipping", "l2_clip"))
    assert set(table) == {"clipping", "l2_clip"}, f"the table names other flags: {table}"
    for flag, (ignored, why) in table.items():
        assert ignored == nonprivate, f"--{flag} ignored={ignored} in a nonprivate={nonprivate} run"
        assert "--nodp" in why, f"--{flag}'s reason does not name the mode: {why!r}"


@pytest.mark.parametrize("config_class", [FedAvgClassifierConfig, DpSgdConfig])
@pytest.mark.parametrize("kwargs, says", [
    ({"audit_canaries": 19}, ">= 20"),
    ({"audit_canaries": 20, "nodp": True, "noise_multiplier": None}, "--nodp"),
    ({"audit_canaries": 20, "sampling": "fixed"}, "--sampling=poisson"),
])
def test_an_audit_that_cannot_run_is_a_config_error_naming_it(config_class, kwargs, says):
    with pytest.raises(ConfigError, match=says) as error:
        config_class(**{"noise_multiplier": 1.0, **kwargs})
    assert error.value.field == "audit_canaries", (
        f"{config_class.__name__} names {error.value.field}")
