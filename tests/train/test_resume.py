"""Starting or resuming a run: state and ledger restored together, the current target kept."""

import dataclasses

import numpy as np
import pytest
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.config import ConfigError
from dpfed.train.resume import budget_stop, resume_or_start
from dpfed.train.workdir import Workdir

EVENT = dp_event.GaussianDpEvent(2.0)


@dataclasses.dataclass
class Config:
    steps: int = 10
    target_epsilon: float | None = None
    lr: float = 0.1


def ledger(target=None, releases=0):
    result = privacy.PrivacyLedger("example", "add_or_remove_one", 1e-5, target_epsilon=target)
    if releases:
        result.record(EVENT, releases)
    return result


def state(step):
    return {"w": np.full(3, float(step), np.float32), "step": np.full((), step, np.int32)}


def start(path, fresh_ledger, config=None, messages=None):
    wd = Workdir(path)
    return resume_or_start(
        Checkpointer(wd.file("checkpoints")), wd, state(0), fresh_ledger,
        step_of=lambda s: int(s["step"]), config=config or Config(),
        log=(messages.append if messages is not None else lambda _: None),
    )


def checkpoint(path, step, saved_ledger):
    wd = Workdir(path)
    stored = saved_ledger.to_json(with_pld=False) if saved_ledger else None
    Checkpointer(wd.file("checkpoints")).save(step, state(step), {"ledger": stored})
    for s in range(1, step + 3):  # metrics logged past the checkpoint by a killed run
        wd.append_metrics({"step": s})


def test_fresh_run_starts_at_zero_with_its_own_ledger_and_pins_config(tmp_path):
    fresh = ledger(target=1.0)
    result = start(tmp_path, fresh)
    assert (result.step, result.resumed) == (0, False), "no checkpoint: a fresh start"
    assert result.ledger is fresh and result.state["w"].sum() == 0
    assert (tmp_path / "config.json").exists(), "the fresh run pins its config"


def test_resume_restores_state_and_ledger_and_drops_later_metrics(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 4, ledger(releases=4))
    messages = []
    result = start(tmp_path, ledger(), messages=messages)
    assert (result.step, result.resumed) == (4, True)
    np.testing.assert_array_equal(result.state["w"], np.full(3, 4.0), "restored state")
    assert result.ledger.num_releases == 4, "the checkpoint's releases are kept, not recounted"
    steps = [r["step"] for r in Workdir(tmp_path).read_metrics()]
    assert steps == [1, 2, 3, 4], f"records after the checkpoint must go: {steps}"
    assert messages == [f"resumed from step 4 in {tmp_path}"]


def test_resume_adopts_the_target_of_this_invocation(tmp_path):
    Workdir(tmp_path).pin_config(Config(target_epsilon=50.0), resuming=False)
    checkpoint(tmp_path, 4, ledger(target=50.0, releases=4))
    result = start(tmp_path, ledger(target=3.0), config=Config(target_epsilon=3.0))
    assert result.ledger.target_epsilon == 3.0, (
        "a resumed run must honour the target it is launched with, not the checkpoint's: "
        "keeping the old target would spend past the budget the user asked for"
    )
    assert result.ledger.num_releases == 4


def test_resume_under_changed_setting_is_refused(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 2, ledger(releases=2))
    with pytest.raises(ConfigError) as error:
        start(tmp_path, ledger(), config=Config(lr=0.2))
    assert error.value.field == "lr"


def test_private_run_cannot_resume_a_non_private_checkpoint(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 2, None)
    with pytest.raises(ValueError, match="non-private"):
        start(tmp_path, ledger())


def _eps(count):
    return privacy.epsilon(dp_event.SelfComposedDpEvent(EVENT, count), 1e-5)


def test_budget_stop_counts_the_restored_releases():
    target = _eps(7) * 1.0001
    assert budget_stop(ledger(target, releases=4), EVENT, 4, 20, log=print) == 7, (
        "4 spent + 3 more fit a target of 7 releases"
    )


def test_budget_stop_divides_by_events_per_step():
    target = _eps(7) * 1.0001
    assert budget_stop(ledger(target), EVENT, 0, 20, events_per_step=2) == 3, (
        "7 releases of 2 per step: 3 whole steps"
    )


def test_budget_stop_without_target_runs_to_the_end():
    assert budget_stop(ledger(None, releases=4), EVENT, 4, 20) == 20
    assert budget_stop(None, None, 4, 20) == 20


def test_budget_stop_says_when_the_checkpoint_already_exceeds_the_target():
    messages = []
    last = budget_stop(ledger(_eps(3), releases=5), EVENT, 5, 20, log=messages.append)
    assert last == 5, "no further step once the spent eps exceeds the target"
    assert "already spends" in messages[0], messages
