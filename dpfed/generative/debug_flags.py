"""The flags both debug binaries define (`experiments/fedgan_debug.py`, `fedlm_debug.py`).

The two demos (`fedgan_debug`, `fedlm_debug`) split the clients the same way (`selection`)
and train each group's model with the same DP-FedAvg settings, so their configs share
these fields and the binaries these flags. Each flag is named as the config field it
sets (`config_fields`). The flags defined here belong to the binary that calls
`define_debug_flags`: its --help lists them with its own.
"""

from collections.abc import Iterable
from typing import Any

from absl import flags

from dpfed.generative import group_sizes
from dpfed.train import cli

flags.disclaim_key_flags()  # The DEFINEs below are the calling binary's flags.


def define_debug_flags(
    defaults: Any, *, model: str, metric: str, update: str,
    paper_thresholds: tuple[float, float] | None = None,
) -> list[flags.FlagHolder]:
    """Defines the flags of the settings both demos have; returns their holders, but for
    `--seed` and `--secret_seed`: the binary reads those through `cli.seed_fields`.

    Args:
      defaults: the demo's default config (each flag's default is its field's).
      model: what one group trains, for the help texts (e.g. "GAN").
      metric: the per-client value the groups are split by (e.g. "Accuracy").
      update: what each user's clipped update is (e.g. "D's delta").
      paper_thresholds: the paper's low and high thresholds, where it gives them.
    """
    cli.define_seed_flag(defaults.seed)
    cli.define_secret_seed_flag()
    low_paper, high_paper = (
        (f" (paper {t:g})" for t in paper_thresholds) if paper_thresholds else ("", ""))
    return [
        flags.DEFINE_float(
            "low_threshold", None, f"{metric} <= this: low group{low_paper}."),
        flags.DEFINE_float(
            "high_threshold", None, f"{metric} >= this: high group{high_paper}."),
        flags.DEFINE_float(
            "low_quantile", defaults.low_quantile, "Default low threshold quantile."),
        flags.DEFINE_float(
            "high_quantile", defaults.high_quantile, "Default high threshold quantile."),
        flags.DEFINE_integer("rounds", defaults.rounds, f"Federated rounds per {model}."),
        flags.DEFINE_float("clients_per_round", defaults.clients_per_round, "Cohort size."),
        flags.DEFINE_enum("sampling", defaults.sampling, ["poisson", "fixed"], "Cohorts."),
        *group_sizes.define_group_sampling_flags(defaults),
        flags.DEFINE_float("l2_clip", defaults.l2_clip, f"Per-user clip norm of {update}."),
        flags.DEFINE_float(
            "noise_multiplier", defaults.noise_multiplier, "z (0: non-private)."),
        flags.DEFINE_float("delta", defaults.delta, "delta of the user-level guarantee."),
        flags.DEFINE_integer("eval_every", defaults.eval_every, "Evaluate every N rounds."),
        flags.DEFINE_integer("checkpoint_every", defaults.checkpoint_every, "Checkpoints."),
    ]


def config_fields(holders: Iterable[flags.FlagHolder]) -> dict[str, Any]:
    """{flag name: its value}: the config fields that `define_debug_flags`' flags set."""
    return {holder.name: holder.value for holder in holders}
