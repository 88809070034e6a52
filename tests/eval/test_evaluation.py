"""Tests for dpfed.eval.evaluation: sources, eval.json, figures and the report section."""

import dataclasses

import jax
import numpy as np
import pytest

from dpfed import data
from dpfed.eval import classifier_fit, downstream, evaluation
from dpfed.generative import contract
from dpfed.train.workdir import EVAL_BEGIN, Workdir


@pytest.fixture
def config(cache_dir):
    return evaluation.EvalConfig(
        dataset="digits",
        num_samples=300,
        downstream=downstream.DownstreamConfig(fit=classifier_fit.FitConfig(max_epochs=1)),
        models=("logreg",),
        cache_dir=str(cache_dir),
    )


def _digits_npz(path, n=300):
    train = data.load("digits", "train")
    synthetic = contract.SyntheticSet(train.images[:n].copy(), train.labels[:n].copy())
    return contract.save_synthetic(path, synthetic)


def test_synthetic_npz_gets_fid_accuracy_and_figures(tmp_path, config):
    _digits_npz(tmp_path / contract.SYNTHETIC_FILE)
    source = evaluation.detect_source(Workdir(tmp_path))
    record = evaluation.evaluate(tmp_path, source, config)
    assert source.kind == "synthetic_file", source
    assert record["fid_domain"] >= 0 and "fid_domain_extractor" in record, record
    assert 0 <= record["downstream"]["logreg"]["test_accuracy"] <= 1, record["downstream"]
    for name in record["figures"]:
        assert (tmp_path / name).exists(), f"figure {name} missing"
    assert Workdir(tmp_path).read_json(evaluation.EVAL_FILE) == record, "eval.json differs"


def test_report_section_is_replaced_and_trainer_text_kept(tmp_path, config):
    wd = Workdir(tmp_path)
    wd.write_report("# Trainer report\n\nkept\n")
    _digits_npz(tmp_path / contract.SYNTHETIC_FILE)
    for _ in range(2):
        evaluation.evaluate(tmp_path, evaluation.detect_source(wd), config)
    report = wd.file("report.md").read_text()
    assert report.startswith("# Trainer report\n\nkept\n"), report
    assert report.count(EVAL_BEGIN) == 1, "re-evaluating duplicated the section"


def test_report_section_says_the_evaluation_is_not_private(tmp_path, config):
    _digits_npz(tmp_path / contract.SYNTHETIC_FILE)
    evaluation.evaluate(tmp_path, evaluation.detect_source(Workdir(tmp_path)), config)
    report = Workdir(tmp_path).file("report.md").read_text()
    assert "not covered by the privacy guarantee" in report and "real train split" in report, (
        "the section must say its figures use the real data and are not a DP release")


def test_classifier_workdir_is_the_direct_training_row(tmp_path, config):
    wd = Workdir(tmp_path)
    flags = {"model": "cnn", "dataset": "digits"}
    wd.write_summary({"test_accuracy": 0.91, "wall_seconds": 12.0, "flags": flags})
    wd.write_json(
        "ledger.json", {"epsilon_rdp": 1.0, "epsilon_pld": 0.9, "delta": 1e-5, "unit": "example"}
    )
    source = evaluation.detect_source(wd)
    record = evaluation.evaluate(tmp_path, source, config)
    assert source.kind == "classifier", source
    assert record["downstream"] == {"cnn": {"test_accuracy": 0.91}}, record["downstream"]
    assert record["privacy"]["epsilon_rdp"] == 1.0, record["privacy"]


def test_a_fedavg_classifier_workdir_is_labelled_dp_fedavg(tmp_path, config):
    # Before, every classifier row read "DP-SGD ... by experiments.dpsgd_classifier", a
    # user-level DP-FedAvg run included (found by a CLI audit).
    wd = Workdir(tmp_path)
    flags = {"model": "logreg", "dataset": "digits"}
    wd.write_summary({"test_accuracy": 0.5, "rounds": 3, "steps": 3, "flags": flags})
    record = evaluation.evaluate(tmp_path, evaluation.detect_source(wd), config)
    assert record["method"] == "DP-FedAvg logreg (direct)", record["method"]
    assert "experiments.fedavg_classifier" in record["downstream_note"], record["downstream_note"]


@pytest.mark.parametrize("flag", evaluation.IMAGE_FLAGS)
def test_image_flags_are_unused_for_a_classifier_workdir_alone(flag):
    # The table experiments.evaluate refuses given flags by (cli.refuse_unused): a
    # classifier workdir's figure is its trainer's own test accuracy (nothing sampled,
    # embedded or trained), so each was silently ignored there; images use them all.
    def ignored(kind):
        return evaluation.unused_flags(evaluation.Source(kind, "w"))[flag][0]

    assert ignored("classifier"), f"--{flag} has no effect on a classifier workdir"
    for kind in ("generator", "synthetic_file", "real_data"):
        assert not ignored(kind), f"--{flag} takes effect on a {kind} source"


def test_a_classifier_row_refuses_another_dataset_than_its_own(tmp_path, config):
    wd = Workdir(tmp_path)
    wd.write_summary({"test_accuracy": 0.5, "flags": {"model": "cnn", "dataset": "mnist5k"}})
    other = dataclasses.replace(config, dataset="digits")
    with pytest.raises(evaluation.DatasetError, match="mnist5k"):
        evaluation.evaluate(tmp_path, evaluation.detect_source(wd), other)


def test_real_data_is_non_private_and_subsampled(tmp_path, config):
    record = evaluation.evaluate(tmp_path, evaluation.Source("real_data"), config)
    assert record["privacy"] is None, "the ceiling row has no privacy guarantee"
    assert record["num_samples"] == 300, record["num_samples"]


class _Shades:
    """A conditional generator of flat images whose shade is the label / 10."""

    def sample(self, params, key, n, labels=None):
        return np.broadcast_to(labels[:, None, None, None] / 10.0, (n, 8, 8, 1)), labels


def test_generator_workdir_is_sampled_through_the_contract(tmp_path, config):
    contract.register_generator("test_shades", lambda workdir: (_Shades(), None))
    Workdir(tmp_path).write_summary({"method": "test_shades", "flags": {"dataset": "digits"}})
    record = evaluation.evaluate(tmp_path, evaluation.detect_source(Workdir(tmp_path)), config)
    assert record["method"] == "test_shades" and record["num_samples"] == 300, record


def test_wrong_image_shape_is_an_evaluation_error(tmp_path, config):
    images = np.zeros((30, 28, 28, 1), np.float32)
    contract.save_synthetic(tmp_path / "s.npz", contract.SyntheticSet(images, np.zeros(30, int)))
    source = evaluation.Source("synthetic_file", str(tmp_path / "s.npz"))
    with pytest.raises(evaluation.EvaluationError, match="digits images are"):
        evaluation.evaluate(tmp_path, source, config)


def test_empty_workdir_has_nothing_to_evaluate(tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="no generator"):
        evaluation.detect_source(Workdir(tmp_path))


def test_fid_domain_compares_with_the_real_test_split(tmp_path, config):
    test = data.load("digits", "test")
    contract.save_synthetic(
        tmp_path / contract.SYNTHETIC_FILE,
        contract.SyntheticSet(test.images.copy(), test.labels.copy()),
    )
    record = evaluation.evaluate(
        tmp_path, evaluation.detect_source(Workdir(tmp_path)),
        dataclasses.replace(config, num_samples=None),
    )
    assert record["fid_domain"] == pytest.approx(0.0, abs=1e-6), (
        f"the test split itself must be at distance 0 from the test split: {record['fid_domain']}")


def test_synthetic_labels_outside_the_classes_are_an_evaluation_error(tmp_path, config):
    images = data.load("digits", "train").images[:30].copy()
    path = tmp_path / "s.npz"
    contract.save_synthetic(path, contract.SyntheticSet(images, np.full(30, 10)))  # classes 0..9
    with pytest.raises(evaluation.EvaluationError, match="labels"):
        evaluation.evaluate(tmp_path, evaluation.Source("synthetic_file", str(path)), config)


def test_a_generator_draws_as_many_samples_as_the_train_split_by_default(tmp_path, config):
    contract.register_generator("test_shades_all", lambda workdir: (_Shades(), None))
    Workdir(tmp_path).write_summary({"method": "test_shades_all", "flags": {"dataset": "digits"}})
    record = evaluation.evaluate(tmp_path, evaluation.detect_source(Workdir(tmp_path)),
                                 dataclasses.replace(config, num_samples=None))
    assert record["num_samples"] == data.load("digits", "train").num_examples, record


@pytest.mark.parametrize("text", ['{"epsilon_rdp": 1.', "[1.0]"])
def test_a_damaged_ledger_json_is_an_evaluation_error_naming_it(tmp_path, text):
    wd = Workdir(tmp_path)
    wd.file("ledger.json").write_text(text)
    with pytest.raises(evaluation.EvaluationError, match="ledger.json"):
        evaluation.privacy_of(wd)


def test_a_ledger_past_the_released_model_is_an_evaluation_error(tmp_path, config):
    # A finished run (eps 1.3) extended and killed: ledger.json (eps 8.6) counts steps the
    # released model, of summary.json, never took; the pair would mislabel the model.
    contract.register_generator("test_shades_extended", lambda workdir: (_Shades(), None))
    wd = Workdir(tmp_path)
    wd.write_summary({"method": "test_shades_extended", "flags": {"dataset": "digits"},
                      "epsilon_rdp": 1.3})
    wd.write_json("ledger.json", {"epsilon_rdp": 8.6, "delta": 1e-5, "unit": "example"})
    with pytest.raises(evaluation.EvaluationError, match="killed"):
        evaluation.evaluate(tmp_path, evaluation.detect_source(wd), config)
    wd.write_json("ledger.json", {"epsilon_rdp": 1.3, "delta": 1e-5, "unit": "example"})
    assert evaluation.privacy_of(wd)["epsilon_rdp"] == 1.3, "a finished run's pair is fine"


def test_an_fid_of_few_samples_is_reported_with_its_sample_sizes(tmp_path, config):
    _digits_npz(tmp_path / contract.SYNTHETIC_FILE, n=20)
    record = evaluation.evaluate(tmp_path, evaluation.detect_source(Workdir(tmp_path)),
                                 dataclasses.replace(config, num_samples=20))
    test_size = data.load("digits", "test").num_examples
    assert record["sample_size_note"].startswith(f"FID of 20 synthetic against {test_size:,}"), (
        record["sample_size_note"])
    report = Workdir(tmp_path).file("report.md").read_text()
    assert record["sample_size_note"] in report, "the report must carry the caveat"


def test_a_method_without_an_image_generator_is_named_before_the_dataset(tmp_path, config):
    # A fedlm_debug workdir (language models) was first refused for a missing --dataset.
    Workdir(tmp_path).write_json("summary.json", {"method": "fedlm_debug"})
    source = evaluation.detect_source(Workdir(tmp_path))
    with pytest.raises(evaluation.EvaluationError, match="'fedlm_debug' has no image generator"):
        evaluation.evaluate(tmp_path, source, dataclasses.replace(config, dataset=None))


@pytest.mark.parametrize("n,message", [(4, "cannot hold out 10% of 4"), (1, "at least 2")])
def test_too_few_synthetic_images_are_an_evaluation_error(tmp_path, config, n, message):
    # They ended in a traceback (exit 1) after the FID work, not in exit 2 and one line.
    path = _digits_npz(tmp_path / "s.npz", n=n)
    with pytest.raises(evaluation.EvaluationError, match=message):
        evaluation.evaluate(tmp_path, evaluation.Source("synthetic_file", str(path)),
                            dataclasses.replace(config, num_samples=None))


def test_sampling_and_downstream_training_use_different_keys(tmp_path, config, monkeypatch):
    # Chunk 1 of contract.sample_synthetic was drawn with fold_in(key(seed), 1), the very
    # key the downstream split and fits were drawn from.
    sample_keys, downstream_keys = [], []

    class Recording(_Shades):
        def sample(self, params, key, n, labels=None):
            sample_keys.append(np.asarray(jax.random.key_data(key)))
            return super().sample(params, key, n, labels)

    def fake_downstream(synthetic, test, num_classes, key, *args):
        downstream_keys.append(np.asarray(jax.random.key_data(key)))
        return {}

    monkeypatch.setattr(downstream, "evaluate_downstream", fake_downstream)
    contract.register_generator("test_recording", lambda workdir: (Recording(), None))
    Workdir(tmp_path).write_summary({"method": "test_recording", "flags": {"dataset": "digits"}})
    evaluation.evaluate(tmp_path, evaluation.detect_source(Workdir(tmp_path)),
                        dataclasses.replace(config, num_samples=2000))
    assert len(sample_keys) == 2 and len(downstream_keys) == 1, (sample_keys, downstream_keys)
    reused = [i for i, key in enumerate(sample_keys) if (key == downstream_keys[0]).all()]
    assert not reused, f"sample chunk(s) {reused} drew with the downstream training key"
