"""Tests for dpfed.train.workdir."""

import dataclasses
import errno
import json
import math
import os
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.train import workdir as workdir_lib
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir, environment_info, params_sha256
from tests.binary import workdir_locked_by_another_process


def _strict_json(text):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_constructor_creates_directory(tmp_path):
    wd = Workdir(tmp_path / "a" / "b")
    assert wd.path.is_dir(), f"Workdir did not create {wd.path}"
    assert wd.file("x.json") == wd.path / "x.json", "file() should join the name to the path"


def test_json_round_trip_converts_numpy_and_jax(tmp_path):
    wd = Workdir(tmp_path)
    obj = {
        "np_float": np.float32(0.5),
        "np_int": np.int64(3),
        "jax_scalar": jnp.float32(1.5),
        "jax_array": jnp.arange(3, dtype=jnp.int32),
        "np_matrix": np.eye(2, dtype=np.float32),
        "bf16": jnp.ones(2, jnp.bfloat16),
        "tuple": (1, 2),
        "flag": np.bool_(True),
    }
    wd.write_json("obj.json", obj)
    expected = {
        "np_float": 0.5,
        "np_int": 3,
        "jax_scalar": 1.5,
        "jax_array": [0, 1, 2],
        "np_matrix": [[1.0, 0.0], [0.0, 1.0]],
        "bf16": [1.0, 1.0],
        "tuple": [1, 2],
        "flag": True,
    }
    assert wd.read_json("obj.json") == expected, "numpy/jax values did not become Python values"


def test_non_finite_floats_are_strict_json_and_round_trip(tmp_path):
    wd = Workdir(tmp_path)
    wd.write_json("eps.json", {"eps": math.inf, "neg": -np.inf, "bad": np.float32("nan")})
    _strict_json(wd.file("eps.json").read_text())  # Raises on NaN/Infinity literals.
    back = wd.read_json("eps.json")
    assert back["eps"] == math.inf and back["neg"] == -math.inf and math.isnan(back["bad"]), (
        f"non-finite floats did not round-trip: {back}"
    )


def test_unserialisable_value_raises_type_error(tmp_path):
    with pytest.raises(TypeError, match="object"):
        Workdir(tmp_path).write_json("x.json", {"x": object()})


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    wd = Workdir(tmp_path)
    wd.write_json("s.json", {"version": 1})

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        wd.write_json("s.json", {"version": 2})
    assert wd.read_json("s.json") == {"version": 1}, "a failed write damaged the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"], "a temp file was left"


def test_failed_bytes_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    # Released parameters (generator.msgpack, ...) were written in place: a kill mid-write
    # left a torn file (found by a kill-fuzz audit reading the code).
    wd = Workdir(tmp_path)
    assert wd.write_bytes("g.msgpack", b"\x01\x02").read_bytes() == b"\x01\x02"

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        wd.write_bytes("g.msgpack", b"\x03" * 100)
    assert wd.file("g.msgpack").read_bytes() == b"\x01\x02", "a failed write damaged the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.msgpack"], "a temp file was left"


def test_only_process_zero_of_a_multi_host_job_writes_files(tmp_path, monkeypatch):
    wd = Workdir(tmp_path)
    wd.append_metrics({"round": 1})
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    wd.write_json("ledger.json", {"a": 1})
    wd.write_bytes("params.bin", b"x")
    wd.write_report("# r")
    workdir_lib.atomic_write_with(wd.file("grid.png"), lambda f: f.write(b"png"))
    wd.append_metrics({"round": 2})
    wd.append_diagnostics({"round": 2})
    wd.truncate_logs(0, key="round")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"], (
        "process 1 must write nothing: process 0 writes the same records")
    assert wd.read_metrics() == [{"round": 1}], "process 1 reads the log, never cuts it"


@pytest.mark.parametrize("process", [0, 1])
def test_each_write_of_a_multi_host_job_sits_between_two_barriers(tmp_path, monkeypatch,
                                                                   process):
    # Else a process can read a file before process 0 has written it (fedgan_debug's
    # read-back of its generator failed so in a 2-process job), or branch on whether it
    # exists while the others saw otherwise.
    wd = Workdir(tmp_path)
    seen = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(workdir_lib.multihost_utils, "sync_global_devices", lambda name: (
        seen.append((name, sorted(p.name for p in tmp_path.iterdir())))))
    wd.write_json("summary.json", {"a": 1})
    wd.append_metrics({"round": 1})
    written = ["metrics.jsonl", "summary.json"] if process == 0 else []
    assert seen == [
        ("dpfed: before writing summary.json", []),
        ("dpfed: after writing summary.json", written[1:]),
        ("dpfed: before writing metrics.jsonl", written[1:]),
        ("dpfed: after writing metrics.jsonl", written),
    ], f"process {process}: each file written (by process 0 only) between its barriers"


def test_every_process_writes_its_host_cache_without_barriers(tmp_path, monkeypatch):
    # A host-local cache: another host may skip this write (its cache holds the file), so
    # a barrier here would wait for it forever.
    def refuse(name):
        raise AssertionError(f"a host cache write must not wait for other hosts: {name}")

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(workdir_lib.multihost_utils, "sync_global_devices", refuse)
    workdir_lib.atomic_write_local_bytes(tmp_path / "weights.msgpack", b"w")
    assert (tmp_path / "weights.msgpack").read_bytes() == b"w", "process 1 must write its cache"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.msgpack"], "a temp file left"


def test_metrics_append_and_read_in_order(tmp_path):
    wd = Workdir(tmp_path)
    for step in range(3):
        wd.append_metrics({"step": step, "loss": np.float32(step / 2)})
    assert wd.read_metrics() == [{"step": s, "loss": s / 2} for s in range(3)], (
        "metrics.jsonl records differ from those appended"
    )
    assert len(wd.file("metrics.jsonl").read_text().splitlines()) == 3, "expected one line each"


def test_read_metrics_of_new_workdir_is_empty(tmp_path):
    assert Workdir(tmp_path).read_metrics() == [], "a fresh workdir should have no metrics"


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    wd = Workdir(tmp_path)
    wd.append_metrics({"step": 1})
    with wd.file("metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # A crash in the middle of a write.
    assert wd.read_metrics() == [{"step": 1}], "a torn last line should be ignored"
    Workdir(tmp_path).append_metrics({"step": 2})
    assert wd.read_metrics() == [{"step": 1}, {"step": 2}], "appending after a torn line failed"


def test_truncate_logs_drops_later_steps(tmp_path):
    wd = Workdir(tmp_path)
    for step in (10, 20, 30):
        wd.append_metrics({"step": step})
    wd.append_metrics({"note": "no step"})
    dropped = wd.truncate_logs(after_step=20)
    assert dropped == 1, f"expected to drop 1 record, dropped {dropped}"
    assert wd.read_metrics() == [{"step": 10}, {"step": 20}, {"note": "no step"}], (
        "truncate_logs should keep steps <= 20 and records without the key"
    )


def test_truncate_logs_with_other_key(tmp_path):
    wd = Workdir(tmp_path)
    for round_ in range(4):
        wd.append_metrics({"round": round_})
    wd.truncate_logs(after_step=1, key="round")
    assert wd.read_metrics() == [{"round": 0}, {"round": 1}], "key='round' was not honoured"


def test_truncate_logs_without_file_is_noop(tmp_path):
    wd = Workdir(tmp_path)
    assert wd.truncate_logs(5) == 0, "nothing to drop in a fresh workdir"
    assert not wd.file("metrics.jsonl").exists(), "truncate should not create metrics.jsonl"


def test_diagnostics_go_to_their_own_file(tmp_path):
    wd = Workdir(tmp_path)
    wd.append_metrics({"round": 1, "test_accuracy": 0.5})
    wd.append_diagnostics({"round": 1, "cohort_size": 7})
    assert wd.read_metrics() == [{"round": 1, "test_accuracy": 0.5}], (
        "a diagnostic leaked into metrics.jsonl (the release log)"
    )
    assert wd.read_diagnostics() == [{"round": 1, "cohort_size": 7}], (
        "diagnostics.jsonl should hold the diagnostic record"
    )


def test_truncate_logs_truncates_diagnostics_too(tmp_path):
    wd = Workdir(tmp_path)
    for round_ in (1, 2, 3):
        wd.append_metrics({"round": round_})
        wd.append_diagnostics({"round": round_, "cohort_size": round_})
    wd.truncate_logs(after_step=1, key="round")
    assert [r["round"] for r in wd.read_diagnostics()] == [1], (
        "a resume must drop diagnostics logged after its checkpoint, as it does metrics"
    )


def test_torn_diagnostics_line_is_repaired_on_append(tmp_path):
    wd = Workdir(tmp_path)
    wd.append_diagnostics({"round": 1})
    with wd.file("diagnostics.jsonl").open("a") as f:
        f.write('{"round": 2, "co')
    Workdir(tmp_path).append_diagnostics({"round": 2})
    assert wd.read_diagnostics() == [{"round": 1}, {"round": 2}], (
        "appending after a torn diagnostics line failed"
    )


def test_summary_and_report(tmp_path):
    wd = Workdir(tmp_path)
    wd.write_summary({"eps": np.float64(2.5)})
    wd.write_report("# Report\n\n| a | b |")
    assert _strict_json(wd.file("summary.json").read_text()) == {"eps": 2.5}, "bad summary.json"
    assert wd.file("report.md").read_text() == "# Report\n\n| a | b |\n", "bad report.md"


def _params():
    return {
        "dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.zeros(3)},
        "count": np.int32(7),
    }


def test_params_hash_is_stable():
    first, second = params_sha256(_params()), params_sha256(_params())
    assert first == second, "the same params hashed differently"
    assert len(first) == 64, f"expected a sha256 hex digest, got {first!r}"


def test_params_hash_is_the_digest_summaries_recorded():
    # Published summaries and groups.json/data.json carry these digests: a change of how
    # the bytes are fed in must not change them (values of the code that copied them).
    assert params_sha256(_params()) == (
        "71fadd791cf5c18f972923772ac7a859d926eee307fbc98229624fde80b0f1b5"), "params"
    odd = [np.float32(2.5), np.zeros((0, 3), np.int8), np.array([True, False]), jax.random.key(0)]
    assert params_sha256(odd) == (
        "078b0c77cfe7d9fdbdd4124d657b90aef0a0e0cb1af8884c3ac7bab057c8dad7"), (
        "a scalar, an empty array, booleans and a typed key")


def test_params_hash_ignores_dict_insertion_order():
    params = _params()
    reordered = {"count": params["count"], "dense": dict(reversed(params["dense"].items()))}
    assert params_sha256(params) == params_sha256(reordered), "hash depends on insertion order"


def test_params_hash_changes_with_one_element():
    params = _params()
    changed = jax.tree.map(lambda x: x, params)
    changed["dense"]["kernel"] = params["dense"]["kernel"].at[1, 2].add(1e-6)
    assert params_sha256(params) != params_sha256(changed), "a changed element kept the hash"


def test_params_hash_changes_with_dtype_and_shape():
    base = params_sha256({"w": np.zeros(4, np.float32)})
    as_int = params_sha256({"w": np.zeros(4, np.int32)})
    reshaped = params_sha256({"w": np.zeros((2, 2), np.float32)})
    assert len({base, as_int, reshaped}) == 3, "dtype or shape changes kept the hash"


def test_params_hash_big_endian_equals_little_endian():
    values = np.arange(5, dtype="<f4")
    assert params_sha256([values]) == params_sha256([values.astype(">f4")]), (
        "byte order of the input array changed the hash"
    )


def test_params_hash_accepts_typed_keys():
    key = jax.random.key(0)
    assert params_sha256([key]) == params_sha256([jax.random.key_data(key)]), (
        "a typed key should hash like its raw key data"
    )


def test_cpu_info_names_the_model_and_its_vector_units():
    cpuinfo = ("processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu sse4_2 avx avx2 fma "
               "avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9654\n")
    info = workdir_lib.cpu_info(cpuinfo)
    assert info == {"cpu": "AMD EPYC 9654", "cpu_simd": ["sse4_2", "avx", "avx2", "fma",
                                                        "avx512f"]}, (
        f"the model and the vector units XLA:CPU compiles for, in a fixed order: {info}")


def test_environment_info_has_versions_and_no_hostname():
    info = environment_info()
    for name in ("python", "jax", "jaxlib", "flax", "optax", "dp_accounting", "device_kind",
                 "cpu"):
        assert info.get(name), f"environment_info lacks {name}: {info}"
    assert info["device_count"] >= 1, f"bad device_count in {info}"
    hostname = socket.gethostname()
    assert not any("host" in key or value == hostname for key, value in info.items()), (
        f"environment_info leaks the hostname: {info}"
    )


def test_environment_info_records_the_xla_flags_without_paths(monkeypatch):
    # XLA_FLAGS change the floats a run computes (fedavg_classifier's tiny run under
    # --xla_backend_optimization_level=0 ends with another params_sha256, up to 9e-8), so
    # two summaries that agree on everything else must show them; a dump folder can hold
    # a user name, so path values are masked.
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_backend_optimization_level=0  --xla_dump_to=/home/alice/dump")
    info = environment_info()
    assert info.get("xla_flags") == ["--xla_backend_optimization_level=0",
                                     "--xla_dump_to=<path>"], (
        f"summary.json's environment must list XLA_FLAGS (paths masked): {info}")


def test_environment_info_records_the_jax_settings_that_change_numbers():
    # jax_threefry_partitionable changes every random draw of a seed, the other two the
    # precision of matmuls and the default float width.
    config = environment_info().get("jax_config")
    assert config == {
        "jax_threefry_partitionable": jax.config.jax_threefry_partitionable,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "jax_enable_x64": jax.config.jax_enable_x64,
    }, f"summary.json's environment must state the JAX settings that change results: {config}"


def test_dumps_is_strict_json():
    text = workdir_lib.dumps({"x": np.float32("nan")})
    assert _strict_json(text) == {"x": "NaN"}, f"unexpected encoding {text}"


@dataclasses.dataclass(frozen=True)
class _Config:
    noise_multiplier: float = 1.0
    widths: tuple[int, ...] = (8, 16)
    steps: int = 10


def test_pin_config_writes_config_json_on_a_fresh_run(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_config(_Config(), resuming=False)
    assert wd.read_json(workdir_lib.CONFIG_FILE) == {
        "noise_multiplier": 1.0, "widths": [8, 16], "steps": 10
    }


def test_resume_may_extend_steps_but_not_change_other_fields(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_config(_Config(), resuming=False)
    wd.pin_config(_Config(steps=20), resuming=True)  # a longer run continues the checkpoint
    assert wd.read_json(workdir_lib.CONFIG_FILE)["steps"] == 20
    with pytest.raises(ConfigError) as error:
        wd.pin_config(_Config(steps=20, widths=(8, 32)), resuming=True)
    assert error.value.field == "widths", "the error names the changed flag"
    assert "[8, 16]" in error.value.message, "and says what the resumed run used"
    assert wd.read_json(workdir_lib.CONFIG_FILE)["widths"] == [8, 16], "pin kept on refusal"


def test_a_setting_the_resumed_runs_config_json_does_not_pin_is_refused(tmp_path):
    # config.json without a field (cut from the file, or a run from before the setting
    # existed) says nothing of what it was: a resume must not take any value for it.
    wd = Workdir(tmp_path)
    wd.pin_config(_Config(), resuming=False)
    pinned = wd.read_json(workdir_lib.CONFIG_FILE)
    del pinned["noise_multiplier"]
    wd.write_json(workdir_lib.CONFIG_FILE, pinned)
    with pytest.raises(ConfigError) as error:
        wd.pin_config(_Config(noise_multiplier=0.5), resuming=True)
    assert error.value.field == "noise_multiplier", (
        f"a setting config.json does not pin must be refused on a resume: {error.value}")


def test_fresh_run_repins_and_old_workdir_is_pinned_without_check(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_config(_Config(), resuming=False)
    wd.pin_config(_Config(noise_multiplier=2.0), resuming=False)  # no checkpoint: new run
    assert wd.read_json(workdir_lib.CONFIG_FILE)["noise_multiplier"] == 2.0
    old = Workdir(tmp_path / "old")  # checkpoints from before config.json existed
    old.pin_config(_Config(noise_multiplier=3.0), resuming=True)
    assert old.read_json(workdir_lib.CONFIG_FILE)["noise_multiplier"] == 3.0


def test_unreadable_config_json_is_a_config_error_naming_the_workdir(tmp_path):
    wd = Workdir(tmp_path)
    wd.file(workdir_lib.CONFIG_FILE).write_text('{"steps": 1')  # cut short from outside
    with pytest.raises(ConfigError) as error:
        wd.pin_config(_Config(), resuming=True)
    assert error.value.field == "workdir", f"a torn config.json must name the workdir: {error}"


def test_a_config_json_that_is_not_an_object_is_a_config_error_naming_the_workdir(tmp_path):
    wd = Workdir(tmp_path)
    wd.file(workdir_lib.CONFIG_FILE).write_text("null")
    with pytest.raises(ConfigError, match="not an object") as error:
        wd.pin_config(_Config(), resuming=True)
    assert error.value.field == "workdir", error.value.field


def test_a_required_config_json_that_is_missing_is_refused(tmp_path):
    wd = Workdir(tmp_path)
    wd.check_config(_Config(), resuming=True)  # a workdir from before config.json: passes
    with pytest.raises(ConfigError, match="missing") as error:
        wd.check_config(_Config(), resuming=True, required=True)
    assert error.value.field == "workdir", error.value.field


def _training_data(num_examples=6, flag="data_dir"):
    images = np.arange(num_examples * 4, dtype=np.float32).reshape(num_examples, 2, 2, 1)
    labels = np.arange(num_examples, dtype=np.int32) % 3
    return workdir_lib.TrainingData.of((images, labels), flag)


def test_pin_data_writes_the_digest_of_the_training_data_on_a_fresh_run(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_data(_training_data(), resuming=False)
    assert wd.read_json(workdir_lib.DATA_FILE) == {"sha256": _training_data().sha256}, (
        "data.json must hold the digest a resume compares with")


def test_a_resume_on_the_same_data_passes(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_data(_training_data(), resuming=False)
    wd.pin_data(_training_data(), resuming=True)  # equal arrays, e.g. from a moved --data_dir


def test_a_resume_on_other_data_is_refused_naming_the_flag(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_data(_training_data(), resuming=False)
    with pytest.raises(ConfigError, match="differ from those of the run being resumed") as error:
        wd.pin_data(_training_data(num_examples=5), resuming=True)  # a truncated copy
    assert error.value.field == "data_dir", f"must name the flag to look at: {error.value}"
    assert wd.read_json(workdir_lib.DATA_FILE)["sha256"] == _training_data().sha256, (
        "a refused resume must leave the pinned digest as it was")


def test_a_workdir_without_data_json_is_pinned_as_is(tmp_path):
    wd = Workdir(tmp_path)  # a run from before data.json existed
    wd.pin_data(_training_data(num_examples=5), resuming=True)
    assert wd.read_json(workdir_lib.DATA_FILE)["sha256"] == _training_data(5).sha256, (
        "an old workdir must be pinned on its first resume, not refused")


def test_an_unreadable_data_json_is_a_config_error_naming_the_workdir(tmp_path):
    wd = Workdir(tmp_path)
    wd.file(workdir_lib.DATA_FILE).write_text('{"sha256": "ab')  # cut short from outside
    with pytest.raises(ConfigError, match="unreadable") as error:
        wd.check_data(_training_data(), resuming=True)
    assert error.value.field == "workdir", f"a torn data.json must name the workdir: {error}"


def test_read_pin_reads_a_pin_only_on_a_resume_and_where_it_exists(tmp_path):
    wd = Workdir(tmp_path)
    assert wd.read_pin(workdir_lib.DATA_FILE, resuming=True) is None, "no data.json: None"
    wd.write_json(workdir_lib.DATA_FILE, {"sha256": "ab"})
    assert wd.read_pin(workdir_lib.DATA_FILE, resuming=False) is None, (
        "a fresh run compares with no pin (it overwrites it)")
    assert wd.read_pin(workdir_lib.DATA_FILE, resuming=True) == {"sha256": "ab"}, (
        "a resume reads the pinned object")


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", "3"])
def test_a_bad_line_inside_a_log_is_a_config_error_naming_file_and_line(tmp_path, bad):
    wd = Workdir(tmp_path)
    wd.append_metrics({"step": 1})
    with wd.file(workdir_lib.METRICS_FILE).open("a") as f:
        f.write(bad + "\n")
    wd.append_metrics({"step": 2})
    with pytest.raises(ConfigError, match=r"metrics.jsonl, line 2, is not a record") as error:
        wd.read_metrics()
    assert error.value.field == "workdir", error.value.field


def test_atomic_writes_keep_the_files_mode_not_the_temp_files_0600(tmp_path):
    wd = Workdir(tmp_path)
    umask = os.umask(0o022)
    try:
        path = wd.write_json("new.json", {})
        assert path.stat().st_mode & 0o777 == 0o644, "a new file gets the umask's mode"
        path.chmod(0o640)
        wd.write_json("new.json", {"again": 1})
        assert path.stat().st_mode & 0o777 == 0o640, "a rewritten file keeps its mode"
    finally:
        os.umask(umask)


def test_a_workdir_locked_by_another_process_is_refused(tmp_path):
    with workdir_locked_by_another_process(tmp_path):
        with pytest.raises(ConfigError) as error:
            Workdir(tmp_path).lock()
        assert error.value.field == "workdir" and "in use" in error.value.message, str(error)
    Workdir(tmp_path).lock()  # the holder's death released it
    Workdir(tmp_path).lock()  # and this process may take it again: a no-op


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                    caplog):
    # Lustre mounted without `-o flock` fails every flock with ENOSYS: refusing would
    # stop every run there, so the run goes on, warned, and leaves others' files alone.
    leftover = tmp_path / ".summary.json.k3x9.tmp"
    leftover.write_text("{")

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(workdir_lib.fcntl, "flock", no_locks)
    Workdir(tmp_path).lock()
    assert "cannot be locked" in caplog.text, f"the run must be warned: {caplog.text!r}"
    assert leftover.exists(), "without the lock another run may be writing its temp files"


def test_taking_the_lock_removes_temp_files_a_killed_write_left(tmp_path):
    (tmp_path / "group_a").mkdir()
    leftovers = [tmp_path / ".summary.json.k3x9.tmp", tmp_path / "group_a" / ".ledger.json.q1.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / "summary.json"]
    with workdir_locked_by_another_process(tmp_path):
        for path in leftovers + kept:  # the holder's writes, cut by a kill
            path.write_text("{")
        with pytest.raises(ConfigError):
            Workdir(tmp_path).lock()
        assert all(p.exists() for p in leftovers), "a refused lock must not touch others' files"
    Workdir(tmp_path).lock()
    assert not any(p.exists() for p in leftovers), "a killed write's temp files outlive the lock"
    assert all(p.exists() for p in kept), "only atomic writes' `.<name>.<random>.tmp` files go"


@pytest.mark.parametrize("path", ["", "a_file", "a_file/sub"])
def test_a_path_that_cannot_be_a_directory_is_a_config_error_naming_the_workdir(tmp_path, path):
    (tmp_path / "a_file").write_text("not a directory")
    target = str(tmp_path / path) if path else ""
    with pytest.raises(ConfigError) as error:
        Workdir(target)
    assert error.value.field == "workdir", (
        f"{target!r}: an empty path (the current directory) or a file must be refused "
        f"naming the workdir, got {error.value}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_workdir_cannot_be_locked_and_says_so(tmp_path):
    wd = Workdir(tmp_path / "ro")
    wd.path.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as error:
            wd.lock()
    finally:
        wd.path.chmod(0o700)
    assert error.value.field == "workdir" and "cannot be written" in error.value.message, (
        str(error.value))


def test_remove_if_unused_removes_a_tree_of_locks_and_configs_and_their_lock(tmp_path):
    wd = Workdir(tmp_path / "run")
    wd.lock()
    Workdir(wd.file("group_a")).write_json("config.json", {"seed": 0})
    wd.pin_data(_training_data(), resuming=False)
    (wd.path / "checkpoints").mkdir()
    assert workdir_lib.remove_if_unused(wd.path), (
        "a lock, configs, a data digest and empty folders only")
    assert not wd.path.exists(), "the tree must be gone"
    Workdir(wd.path).lock()  # a fresh lock at the same path: the old descriptor was released


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoints/3/state", "ledger.json"])
def test_remove_if_unused_keeps_a_tree_holding_any_other_file(tmp_path, name):
    wd = Workdir(tmp_path / "run")
    wd.lock()
    path = wd.path / "group_a" / name
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    assert not workdir_lib.remove_if_unused(wd.path), f"{name} is a run's output"
    assert path.exists(), f"{name} must never be deleted"


def test_remove_if_unused_removes_empty_parents_but_not_a_siblings(tmp_path):
    created = tmp_path / "sweep"  # the folder a refused run created, with its workdir
    refused, sibling = Workdir(created / "a" / "run"), Workdir(created / "b")
    refused.lock()
    sibling.lock()  # another run's fresh workdir, started at the same time
    assert workdir_lib.remove_if_unused(refused.path, up_to=created)
    assert not (created / "a").exists(), "the empty parents the refused run created must go"
    assert (sibling.path / ".lock").exists(), "another run's workdir must never be removed"


def test_metrics_records_counts_the_file_then_appends_and_truncation(tmp_path):
    Workdir(tmp_path).append_metrics({"step": 1})
    wd = Workdir(tmp_path)  # a new invocation reads the count from the file
    assert wd.metrics_records == 1, "the record of the earlier invocation"
    wd.append_metrics({"step": 2})
    wd.append_metrics({"step": 3})
    assert wd.metrics_records == 3, "each append counted"
    wd.truncate_logs(2)
    assert wd.metrics_records == 2 == len(wd.read_metrics()), "truncation drops step 3"


def test_a_rewritten_report_keeps_the_evaluation_section_only_when_asked(tmp_path):
    wd = Workdir(tmp_path)
    section = f"{workdir_lib.EVAL_BEGIN}\n## Evaluation\nfid 3\n{workdir_lib.EVAL_END}\n"
    wd.write_report("# run\n\nold body\n\n" + section)
    wd.write_report("# run\n\nnew body\n", keep_evaluation=True)
    text = (tmp_path / "report.md").read_text()
    assert text == "# run\n\nnew body\n\n" + section, f"the section moves to the new report: {text}"
    wd.write_report("# run\n\nretrained\n")
    assert "Evaluation" not in (tmp_path / "report.md").read_text(), "a stale section is dropped"
    wd.write_report("# run\n", keep_evaluation=True)
    assert (tmp_path / "report.md").read_text() == "# run\n", "nothing to keep: the report alone"


def test_a_metrics_line_names_its_step_first(tmp_path):
    # A line torn by a crash then names its step before any released value.
    wd = Workdir(tmp_path)
    wd.append_metrics({"test_accuracy": 0.5, "round": 3, "epsilon_rdp": 1.0})
    assert wd.file("metrics.jsonl").read_text() == (
        '{"round": 3, "epsilon_rdp": 1.0, "test_accuracy": 0.5}\n'), "the round is not first"


@pytest.mark.parametrize("torn, released", [
    ('{"step": 2, "test_accuracy": 0.2', {"step": 2, "torn": True}),
    ('{"step": 2}', {"step": 2, "torn": True}),
    ('{"step": 1', None),  # no released value yet (its step may be 1, 10, ...)
    ('{"st', None),
])
def test_a_torn_metrics_line_holding_a_value_is_a_release_at_its_step(tmp_path, torn, released):
    # Its bytes are on disk: a resume must replay its step (ledger.json counts it), not
    # end before it (`resume_or_start` reads `read_released`).
    wd = Workdir(tmp_path)
    wd.append_metrics({"step": 1})
    with wd.file("metrics.jsonl").open("a") as f:
        f.write(torn)
    assert wd.torn_release() == released, f"{torn!r} read as {wd.torn_release()}"
    expected = [{"step": 1}] + ([released] if released else [])
    assert wd.read_released() == expected, "read_released does not list the torn release"


@pytest.mark.parametrize("torn, released", [
    ('{"step": 2, "a": 1, "b": 0.25', {"step": 2, "a": 1}),  # 0.25 may be cut from 0.2567
    ('{"step": 2, "a": 1, "b": 0.25, "c', {"step": 2, "a": 1, "b": 0.25}),
    ('{"step": 2, "a": "x, \\"y", "b', {"step": 2, "a": 'x, "y'}),  # `, "` in a string
    ('{"step": 2, "a": "x, "', {"step": 2}),  # a cut inside a string value: an earlier one
])
def test_a_torn_release_keeps_the_pairs_it_holds_whole(tmp_path, torn, released):
    # A check of the logged mechanism (e.g. DPD-fVAE's local target) reads them.
    wd = Workdir(tmp_path)
    wd.append_metrics({"step": 1})
    with wd.file("metrics.jsonl").open("a") as f:
        f.write(torn)
    assert wd.torn_release() == {**released, "torn": True}, (
        f"{torn!r}: the pairs followed by a comma are whole, no other; got {wd.torn_release()}")


def test_a_torn_release_dropped_by_a_resume_stays_in_unreplayed(tmp_path):
    # Else a resume killed before its replay logs step 2 again would forget it.
    wd = Workdir(tmp_path)
    wd.append_metrics({"step": 1})
    with wd.file("metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "test_accuracy": 0.2')
    wd.truncate_logs(1)
    assert wd.read_metrics() == [{"step": 1}], "the torn line was not cut"
    assert Workdir(tmp_path).read_released() == [{"step": 1}, {"step": 2, "torn": True}], (
        "the torn release was lost by the truncation")
    wd.append_metrics({"step": 2, "test_accuracy": 0.25})
    assert Workdir(tmp_path).read_released() == [{"step": 1}, {"step": 2, "test_accuracy": 0.25}], (
        "the replayed record did not take the torn one's place")


def test_a_torn_metrics_line_naming_no_step_is_refused(tmp_path):
    # Written before steps led the lines: which step it released is unknown.
    wd = Workdir(tmp_path)
    wd.append_metrics({"step": 1})
    with wd.file("metrics.jsonl").open("a") as f:
        f.write('{"epsilon_rdp": 0.9, "step": 2, "test_acc')
    with pytest.raises(ConfigError, match="torn by a crash that names no step"):
        wd.read_released()


class _Ledger:
    """What `append_release` reads of a `PrivacyLedger`: its JSON, here its count."""

    def __init__(self, releases: int):
        self.releases = releases

    def to_json(self, with_pld: bool) -> dict:
        return {"num_releases": self.releases}


def _resumed_after_a_kill(tmp_path, last_line=None) -> Workdir:
    """A workdir whose killed run released steps 1-3 (its ledger.json counting 3), or 1-2
    and `last_line` torn, resumed from a checkpoint of step 1: the resumed run's Workdir."""
    wd = Workdir(tmp_path)
    for step in (1, 2, 3) if last_line is None else (1, 2):
        wd.append_release({"step": step, "epsilon_rdp": step / 10, "test_accuracy": 0.5},
                          _Ledger(step))
    if last_line is not None:
        wd.write_json("ledger.json", _Ledger(3).to_json(with_pld=False))
        with wd.file("metrics.jsonl").open("a") as f:
            f.write(last_line)
    resumed = Workdir(tmp_path)
    resumed.truncate_logs(1)
    return resumed


def test_a_replay_that_differs_from_the_killed_runs_release_is_refused_writing_nothing(
        tmp_path):
    # A resume under other random numbers (JAX_THREEFRY_PARTITIONABLE, a JAX upgrade) drew
    # other noise for step 2: two releases of it, one counted (a crash-safety review).
    wd = _resumed_after_a_kill(tmp_path)
    with pytest.raises(ConfigError, match="replay of step 2 differs") as error:
        wd.append_release({"step": 2, "epsilon_rdp": 0.2, "test_accuracy": 0.6}, _Ledger(2))
    assert error.value.field == "workdir" and "test_accuracy" in error.value.message, error.value
    assert wd.read_metrics() == [{"step": 1, "epsilon_rdp": 0.1, "test_accuracy": 0.5}], (
        "the differing record must not be logged")
    assert wd.read_json("ledger.json") == {"num_releases": 3}, "nor ledger.json touched"


def test_a_replay_equal_to_the_killed_runs_release_is_logged_keeping_the_later_ledger(
        tmp_path):
    # ledger.json counted the killed run's step 3; the replay's ledger of step 2 does not.
    wd = _resumed_after_a_kill(tmp_path)
    wd.append_release({"step": 2, "epsilon_rdp": 0.2, "test_accuracy": 0.5}, _Ledger(2))
    assert wd.read_json("ledger.json") == {"num_releases": 3}, (
        "while the replay is behind step 3, ledger.json must keep counting it")
    wd.append_release({"step": 3, "epsilon_rdp": 0.3, "test_accuracy": 0.5}, _Ledger(3))
    wd.append_release({"step": 4, "epsilon_rdp": 0.4, "test_accuracy": 0.1}, _Ledger(4))
    assert wd.read_json("ledger.json") == {"num_releases": 4}, "past it, the run's own ledger"
    assert [r["step"] for r in wd.read_metrics()] == [1, 2, 3, 4], wd.read_metrics()


@pytest.mark.parametrize("epsilon, refused", [(0.3, False), (0.35, True)])
def test_a_replay_of_a_torn_release_is_compared_on_the_pairs_it_holds(
        tmp_path, epsilon, refused):
    # The torn line holds epsilon_rdp whole, test_accuracy cut short: only the first counts.
    wd = _resumed_after_a_kill(tmp_path, '{"step": 3, "epsilon_rdp": 0.3, "test_accuracy": 0.')
    wd.append_release({"step": 2, "epsilon_rdp": 0.2, "test_accuracy": 0.5}, _Ledger(2))
    record = {"step": 3, "epsilon_rdp": epsilon, "test_accuracy": 0.9}
    if refused:
        with pytest.raises(ConfigError, match="epsilon_rdp"):
            wd.append_release(record, _Ledger(3))
    else:
        wd.append_release(record, _Ledger(3))
        assert wd.read_metrics()[-1] == record, "the torn pairs agree: the replay is logged"


def test_a_non_private_replay_is_not_compared(tmp_path):
    # Without a ledger a record is no DP release: a replay may differ (e.g. on a GPU).
    wd = _resumed_after_a_kill(tmp_path)
    wd.append_release({"step": 2, "epsilon_rdp": 0.2, "test_accuracy": 0.6}, None)
    assert wd.read_metrics()[-1]["test_accuracy"] == 0.6, wd.read_metrics()


def test_a_replay_that_skips_a_step_the_killed_run_logged_is_refused(tmp_path):
    # E.g. a resume with another eval_every: its replay drew step 2's noise again but never
    # logged it, so nothing checked that it was the killed run's release of step 2.
    wd = _resumed_after_a_kill(tmp_path)
    with pytest.raises(ConfigError, match=r"not steps \[2\]") as error:
        wd.append_release({"step": 3, "epsilon_rdp": 0.3, "test_accuracy": 0.5}, _Ledger(3))
    assert error.value.field == "workdir", error.value
    assert [r["step"] for r in wd.read_metrics()] == [1], "nothing logged"


@pytest.mark.parametrize("replay", [
    {"step": 2, "epsilon_rdp": 0.2},  # the killed run's test_accuracy missing
    {"step": 2, "epsilon_rdp": 0.2, "test_accuracy": 0.5, "fid": 3.0},  # a pair it had not
])
def test_a_replay_with_other_pairs_than_the_killed_runs_release_is_refused(tmp_path, replay):
    # The same values where both have a pair are not enough: a step's replay must release
    # what the killed run released there, no less and no more (ledger.json counts it once).
    wd = _resumed_after_a_kill(tmp_path)
    with pytest.raises(ConfigError, match="replay of step 2 differs"):
        wd.append_release(replay, _Ledger(2))
    assert [r["step"] for r in wd.read_metrics()] == [1], "the differing record was logged"


def test_a_resume_with_nothing_to_replay_empties_an_earlier_unreplayed_jsonl(tmp_path):
    # Steps 2-3, dropped by a first resume, were logged again (with step 4); a second
    # resume from a checkpoint of step 4 has nothing to replay. Left in unreplayed.jsonl,
    # steps 2-3 would read as releases this replay skipped: step 5 refused.
    wd = _resumed_after_a_kill(tmp_path)
    for step in (2, 3, 4):
        wd.append_release({"step": step, "epsilon_rdp": step / 10, "test_accuracy": 0.5},
                          _Ledger(step))
    resumed = Workdir(tmp_path)
    resumed.truncate_logs(4)
    resumed.append_release({"step": 5, "epsilon_rdp": 0.5, "test_accuracy": 0.5}, _Ledger(5))
    assert [r["step"] for r in resumed.read_metrics()] == [1, 2, 3, 4, 5], (
        "steps the first replay logged again must not bind the second resume")


def test_a_truncation_rereads_unreplayed_jsonl_in_a_workdir_that_already_released(tmp_path):
    # The same Workdir object released before its truncation (its unreplayed.jsonl then
    # empty): the replay after it must still be compared with the dropped releases.
    wd = Workdir(tmp_path)
    for step in (1, 2, 3):
        wd.append_release({"step": step, "epsilon_rdp": step / 10, "test_accuracy": 0.5},
                          _Ledger(step))
    wd.truncate_logs(1)
    with pytest.raises(ConfigError, match="replay of step 2 differs"):
        wd.append_release({"step": 2, "epsilon_rdp": 0.2, "test_accuracy": 0.6}, _Ledger(2))


def test_unlock_releases_the_lock_to_other_processes(tmp_path):
    # launch.reproduce locks a workdir only to ready it or move it aside; held on, the
    # workdir (or its moved copy) would stay locked while reproduce runs its rows.
    wd = Workdir(tmp_path)
    wd.lock()
    wd.unlock()
    with workdir_locked_by_another_process(tmp_path):  # asserts the child could lock it
        pass
