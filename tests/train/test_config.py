"""Tests for dpfed.train.config: config errors name the field to fix."""

import pytest

from dpfed.train.config import ConfigError, require, require_no_privacy_settings


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
