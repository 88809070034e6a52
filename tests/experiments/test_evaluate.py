"""End-to-end tests of experiments/evaluate.py (subprocesses, digits, small runs)."""

import json

import numpy as np

from dpfed import data
from dpfed.generative import contract
from tests.binary import run_binary

_SMALL = ("--dataset=digits", "--num_samples=200", "--max_epochs=1", "--extractor_steps=10")
_ONE_MODEL = "--models=logreg"


def _run(*args, fresh_process=False):
    return run_binary("experiments.evaluate", *args, check=False, fresh_process=fresh_process)


def _digits_npz(path):
    train = data.load("digits", "train")
    synthetic = contract.SyntheticSet(train.images[:200].copy(), train.labels[:200].copy())
    return contract.save_synthetic(path, synthetic)


def test_npz_evaluation_writes_eval_json_and_figures(tmp_path):
    npz = _digits_npz(tmp_path / "synthetic_digits.npz")
    workdir = tmp_path / "eval"
    proc = _run(
        f"--synthetic={npz}", f"--workdir={workdir}", f"--cache_dir={tmp_path / 'cache'}",
        *_SMALL, _ONE_MODEL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((workdir / "eval.json").read_text())
    assert set(record["downstream"]) == {"logreg"}, record["downstream"]
    assert record["fid_domain"] >= 0, record
    assert (workdir / "eval_samples.png").exists(), "no sample grid written"
    assert "eval_samples.png" in (workdir / "report.md").read_text(), "report lacks the grid"


def test_synthetic_and_real_data_conflict(tmp_path):
    # In a new interpreter, as a user starts it: the one line is all it prints, imports
    # included (the other runs fork from a process that has imported the libraries).
    proc = _run("--synthetic=x.npz", "--real_data", "--dataset=digits", f"--workdir={tmp_path}",
                fresh_process=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: --real_data: conflicts with --synthetic", proc.stderr


def test_unreadable_npz_is_a_flag_error(tmp_path):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros(3))
    proc = _run(f"--synthetic={tmp_path / 'bad.npz'}", f"--workdir={tmp_path}", "--dataset=digits")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --synthetic:") and "no 'images'" in proc.stderr, (
        proc.stderr
    )
    assert len(proc.stderr.strip().splitlines()) == 1, "more than one error line"


def test_missing_inception_weights_is_a_flag_error(tmp_path):
    proc = _run("--real_data", "--dataset=digits", f"--workdir={tmp_path}",
                f"--inception_weights={tmp_path / 'absent.npz'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --inception_weights:"), proc.stderr


def test_empty_workdir_is_a_flag_error(tmp_path):
    proc = _run(f"--workdir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --workdir:"), proc.stderr


def test_an_npz_without_a_dataset_names_the_dataset_flag(tmp_path):
    npz = _digits_npz(tmp_path / "synthetic_digits.npz")
    proc = _run(f"--synthetic={npz}", f"--workdir={tmp_path / 'eval'}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --dataset:"), (
        f"the missing setting is --dataset, not --synthetic: {proc.stderr}")


def test_a_language_model_workdir_is_a_workdir_error_not_a_dataset_one(tmp_path):
    (tmp_path / "summary.json").write_text('{"method": "fedlm_debug"}')
    proc = _run(f"--workdir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --workdir: its method "
                                                           "'fedlm_debug' has no image"), (
        f"the workdir is what cannot be evaluated, whatever --dataset says: {proc.stderr}")


def test_an_image_flag_on_a_classifier_workdir_exits_2_naming_it(tmp_path):
    # A classifier workdir's figure is its trainer's test accuracy: --num_samples (and
    # the other sampling, fid_domain and downstream flags) was silently ignored.
    (tmp_path / "summary.json").write_text(json.dumps(
        {"test_accuracy": 0.5, "flags": {"model": "logreg", "dataset": "digits"}}))
    proc = _run("--num_samples=200", f"--workdir={tmp_path}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: --num_samples") and (
        "classifier workdir" in lines[0]), f"one line naming the flag and why: {lines}"
    assert not (tmp_path / "eval.json").exists(), "a refused evaluation writes no eval.json"
