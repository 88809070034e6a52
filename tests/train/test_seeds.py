"""Tests for dpfed.train.seeds and the secret seed's file (`Workdir.pin_seed`)."""

import ast
import dataclasses
import json
import pathlib
import stat

import jax
import numpy as np
import pytest

import dpfed
from dpfed.federated import classifier, loop
from dpfed.generative import dpd_fvae, fedgan, fedgan_debug, fedlm, fedlm_debug, selection
from dpfed.generative.datalens import partition, training
from dpfed.models.lstm_lm import LstmLM
from dpfed.train import dpsgd, seeds
from dpfed.train import workdir as workdir_lib
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir

_32_BIT_SEEDS = [0, 1, 7, 2**16 + 3, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1,
                 *np.random.default_rng(0).integers(0, 2**32, 8).tolist()]


@pytest.mark.parametrize("seed", _32_BIT_SEEDS)
def test_root_key_of_a_32_bit_seed_is_jax_random_key_bit_for_bit(seed):
    ours, jax_key = seeds.root_key(seed), jax.random.key(seed)
    np.testing.assert_array_equal(
        jax.random.key_data(ours), jax.random.key_data(jax_key),
        err_msg=f"seed {seed}: a run seeded before 64-bit seeds would draw other numbers")
    assert jax.random.key_impl(ours) == jax.random.key_impl(jax_key), "another PRNG impl"
    np.testing.assert_array_equal(
        jax.random.normal(jax.random.fold_in(ours, 3), (4,)),
        jax.random.normal(jax.random.fold_in(jax_key, 3), (4,)),
        err_msg=f"seed {seed}: the same key data must draw the same noise")


@pytest.mark.parametrize("low", [0, 5, 2**32 - 1])
def test_seeds_that_differ_only_in_the_high_32_bits_give_distinct_keys(low):
    # jax.random.key keeps only the low 32 bits: 2**32 + 5 would be seed 5, and a
    # 64-bit secret would have 32 bits of secrecy.
    data = {high: tuple(np.asarray(jax.random.key_data(seeds.root_key(high << 32 | low))))
            for high in (0, 1, 2**31, 2**32 - 1)}
    assert len(set(data.values())) == len(data), f"keys collide across the high half: {data}"
    assert data[2**32 - 1] == (2**32 - 1, low), "key data must be [seed >> 32, seed & 0xFFFFFFFF]"


@pytest.mark.parametrize("seed", [-1, 2**64, 1.0, True, "3"])
def test_root_key_refuses_what_is_not_a_64_bit_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        seeds.root_key(seed)


def test_root_key_takes_numpy_integers():
    np.testing.assert_array_equal(jax.random.key_data(seeds.root_key(np.uint64(2**63 + 9))),
                                  [2**31, 9], err_msg="a numpy uint64 seed must keep all bits")


def test_draw_secret_draws_distinct_seeds_above_32_bits():
    drawn = {seeds.draw_secret() for _ in range(64)}
    assert len(drawn) == 64, "64 draws of 64 bits collided: not drawn from the OS's entropy?"
    assert all(d in seeds.SECRET_SEEDS for d in drawn), f"outside [2**32, 2**64): {drawn}"


@dataclasses.dataclass(frozen=True)
class _Config:
    steps: int = 10
    seed: int = 0
    secret_seed: bool = False


def test_draw_secret_draws_both_32_bit_words_at_random():
    # 64 draws in [2**32, 2**64): two equal high (or low) words among them have odds of
    # ~5e-7 each. A secret of fewer bits (a range far below 2**64, a fixed high word) is
    # found by trying them all.
    drawn = [seeds.draw_secret() for _ in range(64)]
    high, low = [d >> 32 for d in drawn], [d & 0xFFFFFFFF for d in drawn]
    for name, words in (("high", high), ("low", low)):
        assert len(set(words)) == 64, f"the {name} 32 bits of 64 secret seeds repeat: {words}"


def test_public_shows_a_secret_seed_as_secret():
    assert seeds.public(_Config(seed=3)) == 3, "a public seed is shown as it is"
    assert seeds.public(_Config(seed=2**40 + 3, secret_seed=True)) == "secret", (
        "a secret seed must never be shown")


def test_public_fields_hide_a_secret_seed_and_leave_a_public_config_as_before():
    secret = seeds.public_fields(dataclasses.asdict(_Config(seed=2**40, secret_seed=True)))
    assert secret == {"steps": 10, "seed": "secret", "secret_seed": True}, secret
    public = seeds.public_fields(dataclasses.asdict(_Config(seed=3)))
    assert public == {"steps": 10, "seed": 3}, (
        f"without the flag config.json must be as before it existed (old workdirs resume): "
        f"{public}")


def test_a_summary_shows_the_flags_and_seed_as_config_json_does():
    secret = seeds.summary_fields(_Config(seed=2**40, secret_seed=True))
    assert secret == {"flags": {"steps": 10, "seed": "secret", "secret_seed": True},
                      "seed": "secret"}, f"a summary must never show a secret seed: {secret}"
    public = seeds.summary_fields(_Config(seed=3))
    assert public == {"flags": {"steps": 10, "seed": 3}, "seed": 3}, (
        f"without the flag a summary must be as before it existed: {public}")


def test_evaluation_seed_of_a_secret_run_is_public():
    assert seeds.evaluation_seed(_Config(seed=4)) == 4, "a public run evaluates with its seed"
    assert seeds.evaluation_seed(_Config(seed=2**40 + 4, secret_seed=True)) == 0, (
        "eval.json records the evaluation's seed: it must not be the secret")


def test_a_secret_run_pins_secret_in_config_json_and_resumes_only_with_the_flag(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_config(_Config(seed=2**40 + 1, secret_seed=True), resuming=False)
    pinned = wd.read_json(workdir_lib.CONFIG_FILE)
    assert pinned == {"steps": 10, "seed": "secret", "secret_seed": True}, (
        f"config.json must not hold the secret: {pinned}")
    wd.pin_config(_Config(seed=2**40 + 1, secret_seed=True, steps=20), resuming=True)
    with pytest.raises(ConfigError) as error:
        wd.pin_config(_Config(seed=0), resuming=True)
    assert error.value.field == "secret_seed", (
        f"a resume without --secret_seed must be refused naming it: {error.value}")


def test_a_config_json_from_before_the_flag_resumes_without_it(tmp_path):
    wd = Workdir(tmp_path)
    wd.write_json(workdir_lib.CONFIG_FILE, {"steps": 10, "seed": 3})
    wd.pin_config(_Config(seed=3), resuming=True)  # would raise naming secret_seed
    assert wd.read_json(workdir_lib.CONFIG_FILE) == {"steps": 10, "seed": 3}


def test_pin_seed_draws_a_secret_once_and_reads_it_back(tmp_path):
    wd = Workdir(tmp_path)
    wd.lock()
    first = wd.pin_seed(0, secret=True)
    path = wd.file(seeds.SECRET_SEED_FILE)
    assert first in seeds.SECRET_SEEDS, f"not a 64-bit secret seed: {first}"
    stored = json.loads(path.read_text())
    assert stored["seed"] == first and "Never share" in stored["note"], stored
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "only its owner may read the secret"
    wd.pin_config(_Config(seed=first, secret_seed=True), resuming=False)
    assert Workdir(tmp_path).pin_seed(0, secret=True) == first, (
        "a resume or rerun must read the seed back, never draw another")


def test_pin_seed_returns_the_given_seed_without_secret(tmp_path):
    assert Workdir(tmp_path).pin_seed(7, secret=False) == 7
    assert not (tmp_path / seeds.SECRET_SEED_FILE).exists(), "no secret file without the flag"


def test_pin_seed_refuses_the_flag_where_a_run_started_without_it(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_config(_Config(seed=3), resuming=False)
    with pytest.raises(ConfigError, match="no secret_seed.json") as error:
        wd.pin_seed(0, secret=True)
    assert error.value.field == "secret_seed", error.value.field
    assert not wd.file(seeds.SECRET_SEED_FILE).exists(), (
        "a refused run must not leave a secret that would then refuse reruns without the flag")


def test_pin_seed_refuses_the_flag_where_a_run_left_only_checkpoints(tmp_path):
    # A run's checkpoints without its config.json (one from before config.json existed):
    # a secret seed drawn now would go on from a model noised with another seed, under
    # releases that say "secret".
    wd = Workdir(tmp_path)
    (wd.path / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(ConfigError, match="checkpoints") as error:
        wd.pin_seed(0, secret=True)
    assert error.value.field == "secret_seed", error.value.field
    assert not wd.file(seeds.SECRET_SEED_FILE).exists(), (
        "checkpoints show a run started here: no secret seed may be drawn for it")


def test_pin_seed_refuses_a_rerun_without_the_flag_of_a_secret_run(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_seed(0, secret=True)
    with pytest.raises(ConfigError, match="--secret_seed") as error:
        wd.pin_seed(0, secret=False)
    assert error.value.field == "secret_seed", (
        f"a rerun without the flag would draw other noise: it must be refused naming it: "
        f"{error.value}")


def test_an_unreadable_secret_seed_json_is_a_config_error_naming_the_workdir(tmp_path):
    wd = Workdir(tmp_path)
    wd.file(seeds.SECRET_SEED_FILE).write_text('{"seed": 5}')  # a 32-bit seed: not drawn here
    with pytest.raises(ConfigError, match="unreadable") as error:
        wd.pin_seed(0, secret=True)
    assert error.value.field == "workdir", error.value.field


def test_a_refused_run_removes_its_secret_with_the_workdir_it_created(tmp_path):
    wd = Workdir(tmp_path / "run")
    wd.pin_seed(0, secret=True)
    assert workdir_lib.remove_if_unused(wd.path), (
        "a secret drawn by a run refused before it used it is setup, like config.json")


def test_group_seeds_of_a_64_bit_seed_keep_64_bits_and_of_a_32_bit_one_stay_as_they_were():
    assert selection.group_seed(3, "low") == 1007328038, "group seeds of 32-bit seeds changed"
    secret = [selection.group_seed(2**40 + i, group) for i in range(4) for group in ("low", "high")]
    assert len(set(secret)) == len(secret), f"group seeds collide: {secret}"
    assert all(2**32 <= s < 2**64 for s in secret), (
        f"a group's seed derived from a 64-bit seed must not be a guessable 31-bit one: {secret}")


def test_datalens_hash_partition_takes_a_64_bit_seed_and_keeps_its_32_bit_partitions():
    images, labels = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 2
    five = partition.partition_teachers(images, labels, 4, seed=5)
    assert [p.tolist() for p in five] == [  # as with the signed 8-byte key before
        [0, 7, 8, 10, 11, 17, 19], [1, 3, 4, 12, 18], [9, 15, 16], [2, 5, 6, 13, 14]], five
    parts = partition.partition_teachers(images, labels, 4, seed=2**64 - 1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(20)), "not a partition"
    again = partition.partition_teachers(images, labels, 4, seed=2**63 + 5)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, again, strict=True)), (
        "the hash key must depend on the seed's high bits")


def _fedlm_config(**fields):
    local = fedlm.LocalTrainingConfig(LstmLM(8, 4, 4, 1), local_steps=1, batch_size=2)
    return fedlm.FedLmConfig(local, **fields)


def _config_builders():
    """Each config dataclass with `seed` and `secret_seed`, by class name: a callable that
    builds a valid one from those two fields."""
    return {
        "DpSgdConfig": dpsgd.DpSgdConfig,
        "FedAvgClassifierConfig": lambda **f: classifier.FedAvgClassifierConfig(
            noise_multiplier=1.0, **f),
        "DpdFvaeConfig": dpd_fvae.DpdFvaeConfig,
        "FedGanConfig": fedgan.FedGanConfig,
        "DebugConfig": fedgan_debug.DebugConfig,
        "FedLmConfig": _fedlm_config,
        "TextDebugConfig": fedlm_debug.TextDebugConfig,
        "DataLensConfig": training.DataLensConfig,
    }


def test_the_secret_seed_tests_build_every_config_with_a_secret_seed():
    # A config added with a `secret_seed` field must be listed, so the test below covers it.
    declared = set()
    for path in sorted(pathlib.Path(dpfed.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                    and s.target.id == "secret_seed" for s in node.body):
                declared.add(node.name)
    assert declared == set(_config_builders()), (
        f"configs with secret_seed: {sorted(declared)}; tested: {sorted(_config_builders())}")


@pytest.mark.parametrize("name", sorted(_config_builders()))
def test_every_config_refuses_a_secret_seed_outside_the_secret_seeds(name):
    build = _config_builders()[name]
    for seed in (0, 7, 2**32 - 1, 2**64, -1, True, 2.0**40):
        with pytest.raises(ConfigError) as error:
            build(seed=seed, secret_seed=True)
        assert error.value.field == "secret_seed", (
            f"{name}(seed={seed!r}, secret_seed=True) claims a secret over a seed anyone can "
            f"find; refused naming {error.value.field!r}")
        assert str(seed) not in error.value.message, "the refusal must not show the seed"
    for seed in (2**32, 2**64 - 1, np.uint64(2**63), seeds.draw_secret()):
        build(seed=seed, secret_seed=True)  # a secret seed, as Workdir.pin_seed draws it
    build(seed=0, secret_seed=False)  # a public seed stays as it was


def test_is_secret_takes_integers_in_the_secret_seeds_only():
    assert seeds.is_secret(2**32) and seeds.is_secret(np.uint64(2**64 - 1))
    for seed in (2**32 - 1, 2**64, True, 2.0**40, np.float64(2.0**40), "4294967296", None):
        assert not seeds.is_secret(seed), f"{seed!r} is no secret seed"


def test_a_group_seed_of_a_secret_seed_is_a_secret_seed_even_where_its_first_word_is_short(
        monkeypatch):
    # Once in 2**32 secret seeds the sequence's first 64-bit word is below 2**32; a group
    # config of it would then be refused (`require_secret_seed`). The next word is taken.
    words = [5, 2**31, 2**40 + 3, 9]

    class _Short:
        def __init__(self, entropy):
            pass

        def generate_state(self, n, dtype):
            return np.array(words[:n], dtype)

    monkeypatch.setattr(selection.np.random, "SeedSequence", _Short)
    assert selection.group_seed(2**40, "low") == 2**40 + 3


def _secret_run(path):
    """A workdir whose secret run pinned its config: (workdir, its seed)."""
    wd = Workdir(path)
    seed = wd.pin_seed(0, secret=True)
    wd.pin_config(_Config(seed=seed, secret_seed=True), resuming=False)
    return wd, seed


def test_config_json_pins_the_nonce_of_its_secret_seed_json_and_no_seed(tmp_path):
    wd, seed = _secret_run(tmp_path)
    stored = json.loads(wd.file(seeds.SECRET_SEED_FILE).read_text())
    pinned = wd.read_json(workdir_lib.CONFIG_FILE)
    assert len(stored["nonce"]) == 32 and int(stored["nonce"], 16) >= 0, stored["nonce"]
    assert pinned == {"steps": 10, "seed": "secret", "secret_seed": True,
                      seeds.NONCE_FIELD: stored["nonce"]}, pinned
    assert str(seed) not in wd.file(workdir_lib.CONFIG_FILE).read_text()


def test_a_secret_seed_json_from_another_workdir_is_refused(tmp_path):
    ours, our_seed = _secret_run(tmp_path / "ours")
    theirs, their_seed = _secret_run(tmp_path / "theirs")
    own = ours.file(seeds.SECRET_SEED_FILE).read_bytes()
    ours.file(seeds.SECRET_SEED_FILE).write_bytes(theirs.file(seeds.SECRET_SEED_FILE).read_bytes())
    with pytest.raises(ConfigError, match="another run's") as error:
        Workdir(ours.path).pin_seed(0, secret=True)  # what every binary calls first
    assert error.value.field == "secret_seed", error.value.field
    assert str(our_seed) not in str(error.value) and str(their_seed) not in str(error.value)
    with pytest.raises(ConfigError, match="another run's") as error:  # a library resume
        ours.check_config(_Config(seed=their_seed, secret_seed=True), resuming=True)
    assert error.value.field == "secret_seed", error.value.field
    ours.file(seeds.SECRET_SEED_FILE).write_bytes(own)  # its own file back: it resumes
    assert Workdir(ours.path).pin_seed(0, secret=True) == our_seed
    ours.pin_config(_Config(seed=our_seed, secret_seed=True, steps=20), resuming=True)


def test_the_nonce_is_drawn_apart_from_the_seed(tmp_path, monkeypatch):
    # Two runs of one seed: a nonce that were any function of the seed (a digest, say,
    # which hashing every 64-bit seed would invert) would be the same in both.
    monkeypatch.setattr(seeds, "draw_secret", lambda: 2**63 + 12345)
    one, seed_one = _secret_run(tmp_path / "one")
    two, seed_two = _secret_run(tmp_path / "two")
    assert seed_one == seed_two == 2**63 + 12345
    nonces = [w.read_json(workdir_lib.CONFIG_FILE)[seeds.NONCE_FIELD] for w in (one, two)]
    assert nonces[0] != nonces[1], f"the nonce is a function of the seed: {nonces}"


def test_a_secret_run_from_before_nonces_resumes_and_files_across_versions_are_refused(
        tmp_path):
    # Before nonces neither file held one: such a run resumes unchecked. A file with a
    # nonce in such a run, or one without in a run that pinned one, is another run's.
    old = Workdir(tmp_path / "old")
    old_seed = 2**40 + 11
    old.file(seeds.SECRET_SEED_FILE).write_text(json.dumps({"seed": old_seed, "note": "n"}))
    old.write_json(workdir_lib.CONFIG_FILE, {"steps": 10, "seed": "secret", "secret_seed": True})
    assert Workdir(old.path).pin_seed(0, secret=True) == old_seed
    old.pin_config(_Config(seed=old_seed, secret_seed=True), resuming=True)
    assert seeds.NONCE_FIELD not in old.read_json(workdir_lib.CONFIG_FILE), (
        "a resume must not pin a nonce its file does not hold")
    new, _ = _secret_run(tmp_path / "new")
    old_file = old.file(seeds.SECRET_SEED_FILE).read_bytes()
    old.file(seeds.SECRET_SEED_FILE).write_bytes(new.file(seeds.SECRET_SEED_FILE).read_bytes())
    with pytest.raises(ConfigError, match="none \\(a run from before nonces\\)"):
        Workdir(old.path).pin_seed(0, secret=True)
    new.file(seeds.SECRET_SEED_FILE).write_bytes(old_file)
    with pytest.raises(ConfigError, match="none \\(a file from before nonces\\)"):
        Workdir(new.path).pin_seed(0, secret=True)


def test_a_config_whose_secret_seed_is_not_its_workdirs_is_refused(tmp_path):
    wd, seed = _secret_run(tmp_path)
    with pytest.raises(ConfigError, match="is not the secret seed") as error:
        wd.pin_config(_Config(seed=seed + 1, secret_seed=True), resuming=False)
    assert error.value.field == "seed", error.value.field
    assert str(seed) not in str(error.value), "the refusal must not show the seed"


def test_a_secret_seed_json_whose_nonce_is_not_hex_is_unreadable(tmp_path):
    wd = Workdir(tmp_path)
    wd.file(seeds.SECRET_SEED_FILE).write_text(json.dumps({"seed": 2**40, "nonce": 5}))
    with pytest.raises(ConfigError, match="unreadable") as error:
        wd.pin_seed(0, secret=True)
    assert error.value.field == "workdir", error.value.field


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**32, 2**64 - 59])
def test_stream_key_is_the_fold_in_of_the_root_key_it_replaced(seed):
    for stream in (0, 1, 7, 0x5A5E, seeds.INIT_STREAM, seeds.SAMPLE_STREAM):
        expected = jax.random.fold_in(seeds.root_key(seed), stream)
        assert np.array_equal(jax.random.key_data(seeds.stream_key(seed, stream)),
                              jax.random.key_data(expected)), (seed, stream)


def test_the_streams_of_a_root_key_are_distinct_and_above_every_step():
    # Two streams of one value draw the same numbers: the released samples would be drawn
    # with the initial model's key, or the audit's canaries with the samples'. Steps and
    # rounds are folded into the same root (`loop.ROUND_KEY_STREAM`'s children aside).
    streams = {"INIT_STREAM": seeds.INIT_STREAM, "SAMPLE_STREAM": seeds.SAMPLE_STREAM,
               "AUDIT_STREAM": seeds.AUDIT_STREAM, "loop.ROUND_KEY_STREAM": loop.ROUND_KEY_STREAM,
               "selection.SAMPLE_STREAM": selection.SAMPLE_STREAM}
    assert len(set(streams.values())) == len(streams), f"two streams share a value: {streams}"
    for name in ("INIT_STREAM", "SAMPLE_STREAM", "AUDIT_STREAM"):
        assert 2**30 < streams[name] < 2**31, f"{name} must be far above any step index"


def test_a_secret_seed_json_copied_into_a_fresh_workdir_is_used_with_a_warning(
        tmp_path, caplog):
    # Nothing tells it from a run killed before it pinned its config (the tests reproduce
    # a secret run so); two runs of one seed draw the same noise, so the user is told.
    ours, seed = _secret_run(tmp_path / "ours")
    assert "before any run started" not in caplog.text, "a fresh draw warns of nothing"
    Workdir(ours.path).pin_seed(0, secret=True)
    assert "before any run started" not in caplog.text, "a resume warns of nothing"
    copy = Workdir(tmp_path / "copy")
    copy.file(seeds.SECRET_SEED_FILE).write_bytes(ours.file(seeds.SECRET_SEED_FILE).read_bytes())
    with caplog.at_level("WARNING"):
        assert copy.pin_seed(0, secret=True) == seed
    assert "before any run started" in caplog.text and str(seed) not in caplog.text


@dataclasses.dataclass(frozen=True)
class _AuditConfig:
    seed: int = 0
    audit_canaries: int = 0


def test_public_fields_leave_out_an_audit_that_does_not_run():
    assert seeds.public_fields(dataclasses.asdict(_AuditConfig())) == {"seed": 0}, (
        "a run without --audit_canaries must pin the config.json of before the flag")
    assert seeds.public_fields(dataclasses.asdict(_AuditConfig(audit_canaries=5))) == {
        "seed": 0, "audit_canaries": 5}, "an audit run must pin its canaries"
