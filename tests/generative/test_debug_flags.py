"""Tests for dpfed.generative.debug_flags (the flags both debug demos share)."""

from absl import flags

from dpfed.generative import debug_flags


def test_config_fields_gives_every_flags_value():
    # Each holder's value reaches the demo's config: a dropped one (e.g. --delta) would
    # leave its field at the default while the user asked for another value.
    values = flags.FlagValues()
    holders = [flags.DEFINE_float("delta", 1e-5, "delta", flag_values=values),
               flags.DEFINE_float("l2_clip", 1.0, "clip", flag_values=values)]
    values(["demo", "--delta=1e-6", "--l2_clip=0.5"])
    assert debug_flags.config_fields(holders) == {"delta": 1e-6, "l2_clip": 0.5}, (
        "config_fields must give {flag: value} for every flag it is handed")
