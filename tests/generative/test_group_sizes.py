"""Noised group sizes, their ledger and the end-to-end eps (dpfed.generative.group_sizes)."""

import pathlib
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.generative import group_sizes
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir


def test_noisy_group_sizes_add_gaussian_noise_of_the_given_std():
    sizes = {"low": 500, "high": 800}
    draws = np.array([list(group_sizes.noisy_group_sizes(sizes, 10.0, seed).values())
                      for seed in range(400)]) - np.array([500, 800])
    assert abs(draws.std() / 10.0 - 1) < 0.1, f"noise std {draws.std()} should be 10"
    assert abs(draws.mean()) < 4 * 10.0 / np.sqrt(draws.size), f"noise mean {draws.mean()} != 0"
    assert abs(np.corrcoef(draws.T)[0, 1]) < 0.2, "the groups' noise must be independent"


def test_noisy_group_sizes_are_reproducible_and_at_least_one():
    sizes = {"low": 3, "high": 1}
    once = group_sizes.noisy_group_sizes(sizes, 50.0, 7)
    assert once == group_sizes.noisy_group_sizes(sizes, 50.0, 7), (
        "a rerun must release the same sizes, not fresh draws (a second release)")
    floored = [group_sizes.noisy_group_sizes(sizes, 50.0, s) for s in range(20)]
    assert min(v for f in floored for v in f.values()) >= 1.0, "a size below 1 is floored at 1"
    assert any(v == 1.0 for f in floored for v in f.values()), "std 50 on 1-3 must hit the floor"


def test_noisy_group_sizes_are_whole_numbers_that_do_not_give_the_size_away():
    # Unrounded, n + std * e with e a float32 draw was consistent with the true n alone:
    # (v - n') / std is a float32 the sampler returns for n' = n only (the 2026-12-05
    # audit decoded the demo's released 122.61361... as 116 users).
    size, stddev = 116, 10.0
    for seed in range(20):
        v = group_sizes.noisy_group_sizes({"low": size}, stddev, seed)["low"]
        assert isinstance(v, int), f"a released size must be a whole number, got {v!r}"
        for n in (size - 1, size, size + 1):
            e = np.float32((v - n) / stddev)  # the draw that would explain v from n users
            assert round(n + stddev * float(e)) == v, (
                f"{v} must be as consistent with {n} users as with {size}")


def test_group_sizes_ledger_is_one_gaussian_of_sensitivity_one_per_user():
    ledger = group_sizes.group_sizes_ledger(10.0, 1e-5, "accuracies")
    assert (ledger.unit, ledger.neighboring_relation) == ("user", "add_or_remove_one"), (
        "one user changes one group's size by 1 under add/remove")
    assert ledger.entries == [(dp_event.GaussianDpEvent(10.0), 1)], (
        f"one Gaussian release of multiplier std / 1: {ledger.entries}")


def test_end_to_end_eps_composes_the_sizes_with_the_models_ledger(tmp_path):
    sizes = group_sizes.group_sizes_ledger(10.0, 1e-5, "accuracies")
    model = privacy.PrivacyLedger("user", "add_or_remove_one", 1e-5)
    gan = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0))
    model.record(gan, 20)
    wd = Workdir(tmp_path)
    assert group_sizes.end_to_end_epsilon(sizes, wd) == {"rdp": None}, (
        "no model ledger: non-private")
    wd.write_json("ledger.json", model.to_json())
    want = privacy.epsilon(dp_event.ComposedDpEvent([
        dp_event.GaussianDpEvent(10.0), dp_event.SelfComposedDpEvent(gan, 20)]), 1e-5,
        model.relation)
    got = group_sizes.end_to_end_epsilon(sizes, wd)["rdp"]
    assert got == pytest.approx(want, rel=1e-9), f"eps {got} != the accountant's {want}"
    assert got > model.epsilon(), "the sizes' release must cost something"


def test_released_group_sizes_writes_the_ledger_and_the_sizes_it_returns(tmp_path):
    wd = Workdir(tmp_path)
    noisy, ledger = group_sizes.released_group_sizes(
        wd, {"low": 40, "high": 60}, 5.0, 3, 1e-5, "x")
    assert wd.read_json_object(group_sizes.GROUP_SIZES_FILE)["noised_sizes"] == noisy, (
        "the released sizes are the ones the models divide by")
    stored = privacy.PrivacyLedger.from_json(wd.read_json_object(group_sizes.GROUP_SIZES_LEDGER))
    assert stored.entries == ledger.entries, "their ledger is on disk"


def test_a_rerun_reuses_the_released_sizes_instead_of_drawing_again(tmp_path):
    # A second draw (another PRNG implementation, here another seed) is a second release
    # that the ledger does not count.
    wd = Workdir(tmp_path)
    first, _ = group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 5.0, 3, 1e-5, "x")
    again, ledger = group_sizes.released_group_sizes(
        wd, {"low": 40, "high": 60}, 5.0, 4, 1e-5, "x")
    assert again == first, f"the rerun drew {again} where {first} were released"
    assert wd.read_json_object(group_sizes.GROUP_SIZES_FILE)["noised_sizes"] == first, (
        "group_sizes.json must keep the first release")
    assert ledger.entries == [(dp_event.GaussianDpEvent(5.0), 1)], "still one release"


def test_the_ledger_is_written_first_and_the_sizes_only_by_the_draw(tmp_path, monkeypatch):
    # Crash safety: the ledger is on disk before group_sizes.json; a rerun rewrites the
    # (same) ledger and never draws or writes the sizes again.
    wd, write_json, written = Workdir(tmp_path), Workdir.write_json, []

    def record(self, name, obj):
        written.append(name)
        return write_json(self, name, obj)

    monkeypatch.setattr(Workdir, "write_json", record)
    group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 5.0, 3, 1e-5, "x")
    assert written == [group_sizes.GROUP_SIZES_LEDGER, group_sizes.GROUP_SIZES_FILE], (
        f"a first run writes the ledger, then the sizes it drew: {written}")
    written.clear()
    group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 5.0, 3, 1e-5, "x")
    assert written == [group_sizes.GROUP_SIZES_LEDGER], (
        f"a rerun writes the ledger alone (the sizes are released already): {written}")


class _KilledError(Exception):
    """A kill at a write (raised in place of it)."""


@pytest.mark.parametrize("killed_at",
                         [group_sizes.GROUP_SIZES_LEDGER, group_sizes.GROUP_SIZES_FILE])
def test_a_kill_at_either_write_leaves_no_size_outside_a_ledger_and_one_release(
    tmp_path, monkeypatch, killed_at
):
    # The crash-consistency audit's invariant (WORKSPACE.md): killed at any write, the
    # workdir holds no released size its ledger does not count, and the rerun releases
    # the sizes once.
    wd, write_json = Workdir(tmp_path), Workdir.write_json

    def kill_at(self, name, obj):
        if name == killed_at:
            raise _KilledError(name)
        return write_json(self, name, obj)

    with monkeypatch.context() as patch:
        patch.setattr(Workdir, "write_json", kill_at)
        with pytest.raises(_KilledError):
            group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 5.0, 3, 1e-5, "x")
    if wd.file(group_sizes.GROUP_SIZES_FILE).exists():
        assert wd.file(group_sizes.GROUP_SIZES_LEDGER).exists(), (
            f"killed at {killed_at}: group_sizes.json was left without its ledger")
    noisy, _ = group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 5.0, 3, 1e-5, "x")
    stored = privacy.PrivacyLedger.from_json(wd.read_json_object(group_sizes.GROUP_SIZES_LEDGER))
    assert stored.entries == [(dp_event.GaussianDpEvent(5.0), 1)], (
        f"killed at {killed_at}, then rerun: the sizes are one release, {stored.entries}")
    assert noisy == group_sizes.noisy_group_sizes({"low": 40, "high": 60}, 5.0, 3), (
        "the rerun releases the one draw of the seed")


def test_released_sizes_of_another_noise_std_are_refused_naming_the_flag(tmp_path):
    # The same draw e at two stds gives n away: (30 v1 - 10 v2) / 20 = n.
    wd = Workdir(tmp_path)
    group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 10.0, 3, 1e-5, "x")
    with pytest.raises(ConfigError) as error:
        group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 30.0, 3, 1e-5, "x")
    assert error.value.field == "group_size_noise", error.value


def test_refused_sizes_of_another_noise_std_leave_their_ledger_as_it_was(tmp_path):
    # The ledger was written before the check: the refused call left group_sizes.json's
    # std-10 sizes beside a ledger of one std-30 release, which undercounts them.
    wd = Workdir(tmp_path)
    group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 10.0, 3, 1e-5, "x")
    with pytest.raises(ConfigError):
        group_sizes.released_group_sizes(wd, {"low": 40, "high": 60}, 30.0, 3, 1e-5, "x")
    stored = privacy.PrivacyLedger.from_json(wd.read_json_object(group_sizes.GROUP_SIZES_LEDGER))
    assert stored.entries == [(dp_event.GaussianDpEvent(10.0), 1)], (
        f"the ledger must still count the std-10 release group_sizes.json holds: {stored.entries}")


def test_size_row_shows_the_released_size_true_or_noised():
    config = SimpleNamespace(group_size_noise=10.0)
    assert group_sizes.size_row(config, {"num_clients": 6}) == ("clients", "num_clients", "d")
    label, key, spec = group_sizes.size_row(config, {"num_clients_noised": 6})
    assert (label, key, spec) == (
        "clients (size + N(0, 10^2), rounded)", "num_clients_noised", "g"), (
        "with population sampling only the noised size is released, with its noise")


def test_a_small_noised_size_gets_a_warning_naming_the_group_and_the_flag():
    # The floor at 1 turned a true 7 into 1 in a tiny run: a mean 7x too large, unsaid.
    warning = group_sizes.small_group_warning("low", 12, 10.0)
    assert warning and "low group" in warning and "--group_size_noise" in warning, warning
    assert group_sizes.small_group_warning("low", 30, 10.0) is None, (
        "a size of 3 noise stds or more needs no warning")


def test_the_group_sampling_flags_are_listed_in_the_binarys_help(tmp_path):
    # absl's --help lists the main module's key flags: --group_sampling and
    # --group_size_noise were group_sizes' key flags, so the debug demos' --help left out
    # the flags that make their eps end to end.
    binary = tmp_path / "binary.py"
    binary.write_text(textwrap.dedent("""
        \"\"\"A debug binary.\"\"\"
        from types import SimpleNamespace

        from absl import app

        from dpfed.generative import group_sizes

        group_sizes.define_group_sampling_flags(
            SimpleNamespace(group_sampling="group", group_size_noise=10.0))

        if __name__ == "__main__":
            app.run(lambda argv: None)
    """))
    repo = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(binary), "--helpshort"], capture_output=True,
                            text=True, cwd=repo, timeout=60, env={"PYTHONPATH": str(repo)})
    for flag in ("--group_sampling", "--group_size_noise"):
        assert flag in result.stdout, f"--helpshort must list {flag}: {result.stdout}"


def test_the_sizes_noise_is_a_stream_of_its_own():
    # Drawn from another stream of the demo's seed (its released samples' latents, its
    # initial model, its canaries, the root key), the noise would be tied to another draw
    # of the run, not independent of everything else it releases.
    from dpfed.generative import selection
    from dpfed.train import seeds

    size, stddev, seed = 10**6, 1000.0, 3
    noised = group_sizes.noisy_group_sizes({"low": size}, stddev, seed)["low"]
    others = {"the demo's samples": seeds.stream_key(seed, selection.SAMPLE_STREAM),
              "the init stream": seeds.stream_key(seed, seeds.INIT_STREAM),
              "the sample stream": seeds.stream_key(seed, seeds.SAMPLE_STREAM),
              "the audit stream": seeds.stream_key(seed, seeds.AUDIT_STREAM),
              "the root key": seeds.root_key(seed)}
    for name, key in others.items():
        e = float(np.asarray(privacy.standard_normal(key, (1,)))[0])
        assert noised != max(1, round(size + stddev * e)), (
            f"the group sizes' noise is {name}'s first normal draw: a stream another "
            "draw of the demo uses")


def test_population_subpopulations_divide_by_the_noised_sizes_not_the_true_ones(tmp_path):
    # The mean of a population-sampled group divides by q x its size estimate: the true
    # size there would release it without noise (the sizes' ledger would not cover it).
    config = SimpleNamespace(group_sampling="population", group_size_noise=5.0, seed=3,
                             delta=1e-5)
    sizes = {"low": 40, "high": 60}
    subpopulations, ledger = group_sizes.group_subpopulations(
        Workdir(tmp_path), config, sizes, 1000, "x", log=lambda line: None)
    noised = Workdir(tmp_path).read_json_object(group_sizes.GROUP_SIZES_FILE)["noised_sizes"]
    assert noised != sizes, "seed 3 draws noise that moves a size (else the test says nothing)"
    for name in sizes:
        assert subpopulations[name].population == 1000, subpopulations[name]
        assert subpopulations[name].members_estimate == noised[name], (
            f"the {name} group divides by {subpopulations[name].members_estimate}, not its "
            f"released noised size {noised[name]} (true size {sizes[name]})")
    assert ledger is not None and ledger.entries == [(dp_event.GaussianDpEvent(5.0), 1)]
