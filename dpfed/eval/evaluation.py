"""Evaluates one source of labelled images and writes ``eval.json`` + figures to a workdir.

A source is one of (`Source.kind`):
- ``generator``: a generative workdir (the method named in ``summary.json``; see
  `dpfed.generative.contract`) or its ``synthetic.npz`` fallback;
- ``synthetic_file``: any ``.npz`` of images (+ labels) following the contract;
- ``real_data``: the real train split used as if it were synthetic: the ceiling row;
- ``classifier``: a DP-SGD or DP-FedAvg classifier workdir (``experiments.dpsgd_classifier``,
  ``experiments.fedavg_classifier``): the direct-training row, whose test accuracy the
  trainer measured on the real test split.

Synthetic and real sources get `fid_domain` (and ``fid_inception`` when an Inception
extractor is given) against the real test split, and train-on-synthetic / test-on-real
accuracy of the CNN, MLP and logistic regression. ``eval.json`` is the one row format
that ``launch/reproduce.py`` collects into tables.
"""

import dataclasses
import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from dpfed import data
from dpfed.eval import domain_features, fid, figures
from dpfed.eval import downstream as downstream_lib
from dpfed.generative import contract
from dpfed.privacy import format_upper
from dpfed.train.workdir import LEDGER_FILE, SUMMARY_FILE, Workdir, with_eval_section

EVAL_FILE = "eval.json"
SAMPLES_PNG = "eval_samples.png"
SIDE_BY_SIDE_PNG = "eval_real_vs_synthetic.png"
CURVES_PNG = "eval_curves.png"
KINDS = ("generator", "synthetic_file", "real_data", "classifier")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how.

    Attributes:
      dataset: the real dataset; None takes ``flags.dataset`` from the workdir's summary.
      num_samples: synthetic examples to draw (generators) or to use (real data, files);
        None: as many as the real train split has.
      seed: the PRNG seed of sampling, subsampling and downstream training (not of the
        `fid_domain` extractor, which is the same for every evaluation of a dataset).
      downstream: how the downstream classifiers are trained.
      models: which downstream classifiers to train.
      cache_dir: where the `fid_domain` extractor is cached (None: the default).
      extractor_steps: training steps of the `fid_domain` extractor.
      extra_extractors: further feature extractors (e.g. Inception-v3), each adding a
        ``<metric_name>`` entry.
    """

    dataset: str | None = None
    num_samples: int | None = None
    seed: int = 0
    downstream: downstream_lib.DownstreamConfig = downstream_lib.DownstreamConfig()
    models: tuple[str, ...] = downstream_lib.DOWNSTREAM_MODELS
    cache_dir: str | None = None
    extractor_steps: int = domain_features.DEFAULT_STEPS
    extra_extractors: tuple[fid.FeatureExtractor, ...] = ()


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the evaluated images come from (see the module docstring)."""

    kind: str
    path: str | None = None


# `experiments.evaluate`'s flags that only an evaluation of images uses (sampling,
# fid_domain and the downstream classifiers); a classifier workdir's figure is its
# trainer's own test accuracy.
IMAGE_FLAGS = ("num_samples", "seed", "models", "max_epochs", "patience", "val_fraction",
               "cache_dir", "extractor_steps", "inception_weights")


def unused_flags(source: Source) -> dict[str, tuple[bool, str]]:
    """{flag: (whether evaluating `source` ignores it, why)} for `experiments.evaluate`'s
    flags with a default (`cli.refuse_unused` refuses them where given and ignored)."""
    return dict.fromkeys(IMAGE_FLAGS, (
        source.kind == "classifier",
        "for a classifier workdir (its figure is its trainer's test accuracy: nothing is "
        "sampled, embedded or trained)"))


class EvaluationError(ValueError):
    """The source cannot be evaluated as asked (missing files, wrong shapes, ...)."""


class DatasetError(EvaluationError):
    """The dataset to evaluate against is missing, or contradicts the one a figure is of."""


def _read_optional_json(workdir: Workdir, name: str) -> dict:
    """The JSON object in `workdir/name`, {} where there is none.

    Raises:
      EvaluationError: the file is not a JSON object (truncated, say).
    """
    if not workdir.file(name).exists():
        return {}
    try:
        return workdir.read_json_object(name)
    except ValueError as error:
        raise EvaluationError(f"{workdir.file(name)} is unreadable ({error})") from None


def detect_source(workdir: Workdir) -> Source:
    """The kind of source a workdir holds: a generator, a synthetic.npz, a classifier.

    Raises:
      EvaluationError: if the workdir holds none of them.
    """
    summary = _read_optional_json(workdir, SUMMARY_FILE)
    if contract.METHOD_KEY in summary:
        return Source("generator", str(workdir.path))
    if workdir.file(contract.SYNTHETIC_FILE).exists():
        return Source("synthetic_file", str(workdir.file(contract.SYNTHETIC_FILE)))
    if "test_accuracy" in summary and "model" in summary.get("flags", {}):
        return Source("classifier", str(workdir.path))
    raise EvaluationError(
        f"{workdir.path} has no generator (summary.json '{contract.METHOD_KEY}'), no "
        f"{contract.SYNTHETIC_FILE} and no classifier summary to evaluate"
    )


def privacy_of(workdir: Workdir) -> dict | None:
    """eps (RDP, PLD), delta and unit from ledger.json, else summary.json; None when the
    run states no guarantee (non-private).

    Raises:
      EvaluationError: ledger.json counts more than summary.json, the released model's:
        the run went on past it (an extension killed before its end), and its eps would
        be reported beside a model released earlier.
    """
    ledger, summary = _read_optional_json(workdir, LEDGER_FILE), _read_optional_json(
        workdir, SUMMARY_FILE)
    spent, released = ledger.get("epsilon_rdp"), summary.get("epsilon_rdp")
    if spent is not None and released is not None and spent > released * (1 + 1e-9):
        raise EvaluationError(
            f"{workdir.path}'s ledger.json (eps {spent:.6g}) counts steps past its released "
            f"model's summary.json (eps {released:.6g}): a run that trained on from it was "
            "killed. Rerun that run's command to finish it, then evaluate"
        )
    record = ledger or summary
    privacy = {k: record.get(k) for k in ("epsilon_rdp", "epsilon_pld", "delta", "unit")}
    if privacy["epsilon_rdp"] is None and privacy["epsilon_pld"] is None:
        return None
    return privacy


def _check_image_generator(method: str) -> None:
    """Raises `EvaluationError` when ``method`` has no image generator to evaluate (e.g.
    fedlm_debug's language models), before the dataset is looked for: the missing
    --dataset was the first thing said of such a workdir."""
    try:
        contract.generator_loader(method)
    except LookupError as error:
        raise EvaluationError(
            f"its method {method!r} has no image generator to evaluate ({error}); its "
            "summary.json and report.md hold its results") from error


def _dataset_name(config: EvalConfig, summary: dict, kind: str) -> str:
    trained_on = summary.get("flags", {}).get("dataset")
    if kind == "classifier" and config.dataset not in (None, trained_on):
        raise DatasetError(
            f"the classifier's test accuracy is on {trained_on!r} (measured by its trainer), "
            f"not on {config.dataset!r}: leave --dataset out or give {trained_on!r}")
    name = config.dataset or trained_on
    if name is None:
        raise DatasetError("no dataset given and none named in the workdir's summary.json")
    return name


def _subsample(
    synthetic: contract.SyntheticSet, n: int | None, key: jax.Array
) -> contract.SyntheticSet:
    if n is None or n >= len(synthetic.images):
        return synthetic
    keep = np.sort(np.asarray(jax.random.permutation(key, len(synthetic.images)))[:n])
    labels = None if synthetic.labels is None else synthetic.labels[keep]
    return contract.SyntheticSet(synthetic.images[keep], labels)


def load_images(
    source: Source, workdir: Workdir, train: data.ImageDataset, config: EvalConfig
) -> tuple[str, contract.SyntheticSet]:
    """``(method name, images)`` of a generator, synthetic-file or real-data source.

    Sampling uses the stream ``fold_in(key(seed), 0)``; `evaluate_images`'s downstream
    training ``fold_in(key(seed), 1)``. (Sampling from ``key(seed)`` itself gave chunk 1
    of `contract.sample_synthetic` the downstream key: the same random numbers twice.)
    """
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    n = config.num_samples
    if source.kind == "real_data":
        real = contract.SyntheticSet(np.asarray(train.images), np.asarray(train.labels))
        return "real data (ceiling)", _subsample(real, n, key)
    assert source.path is not None  # only real data has no path
    if source.kind == "synthetic_file":
        method = _read_optional_json(workdir, SUMMARY_FILE).get(contract.METHOD_KEY)
        name = method or pathlib.Path(source.path).name
        try:
            synthetic = contract.load_synthetic(source.path)
        except (OSError, ValueError) as error:
            raise EvaluationError(f"cannot read {source.path}: {error}") from error
        return name, _subsample(synthetic, n, key)
    method = workdir.read_json(SUMMARY_FILE)[contract.METHOD_KEY]
    try:
        generator, params = contract.load_generator(Workdir(source.path), method)
    except LookupError as error:
        raise EvaluationError(str(error)) from error
    sampled = contract.sample_synthetic(
        generator, params, key, n or train.num_examples, train.num_classes
    )
    try:
        contract.check_synthetic(sampled)
    except ValueError as error:
        raise EvaluationError(f"{method} generator breaks the contract: {error}") from error
    return method, sampled


def _check_shapes(synthetic: contract.SyntheticSet, real: data.ImageDataset) -> None:
    if synthetic.images.shape[1:] != real.images.shape[1:]:
        raise EvaluationError(
            f"synthetic images are {synthetic.images.shape[1:]} but {real.name} images are "
            f"{real.images.shape[1:]}"
        )
    labels = synthetic.labels
    if labels is not None and (labels.min() < 0 or labels.max() >= real.num_classes):
        raise EvaluationError(f"synthetic labels must be in [0, {real.num_classes})")


def _downstream_json(results: dict[str, downstream_lib.DownstreamResult]) -> dict:
    return {name: result._asdict() for name, result in results.items()}


def evaluate_images(
    synthetic: contract.SyntheticSet,
    train: data.ImageDataset,
    test: data.ImageDataset,
    config: EvalConfig,
) -> dict:
    """fid_domain (+ extra extractors) against ``test`` and downstream accuracies.

    Raises:
      EvaluationError: the images do not match ``test``'s, or are too few for an FID (2)
        or for a validation split of ``config.downstream.val_fraction`` (checked before
        any work, so a bad --num_samples or --val_fraction is one line, not a traceback).
    """
    _check_shapes(synthetic, test)
    n = len(synthetic.images)
    if n < 2:
        raise EvaluationError(f"an FID needs at least 2 synthetic images, got {n}")
    if synthetic.labels is not None:
        try:
            downstream_lib.validation_size(n, config.downstream.val_fraction)
        except ValueError as error:
            raise EvaluationError(f"{error} (--num_samples, --val_fraction)") from None
    extractors = (
        domain_features.domain_extractor(
            train.name, cache_dir=config.cache_dir, steps=config.extractor_steps
        ),
        *config.extra_extractors,
    )
    result: dict[str, Any] = {"num_samples": len(synthetic.images)}
    for extractor in extractors:
        logging.info("%s of %d images vs %s/test", extractor.metric_name, len(synthetic.images),
                     test.name)
        result[extractor.metric_name] = fid.fid(extractor, test.images, synthetic.images)
        result[f"{extractor.metric_name}_extractor"] = extractor.description
    result["sample_size_note"] = fid.sample_size_note(len(synthetic.images), len(test.images))
    if synthetic.labels is None:
        result["downstream"] = None
        result["downstream_note"] = "Unlabelled (unconditional) generator: no downstream accuracy"
        return result
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    logging.info("downstream: training %s on the synthetic set", ", ".join(config.models))
    results = downstream_lib.evaluate_downstream(
        synthetic, (test.images, test.labels), test.num_classes, key, config.downstream,
        config.models,
    )
    result["downstream"] = _downstream_json(results)
    result["downstream_note"] = (
        "Trained on the synthetic set, early-stopped on a held-out "
        f"{config.downstream.val_fraction:.0%} of it, tested once on the real test split"
    )
    return result


def classifier_trainer(summary: dict) -> tuple[str, str]:
    """(algorithm, binary) of a classifier workdir's summary.json: DP-FedAvg's has
    `rounds` (`experiments.fedavg_classifier`), DP-SGD's does not."""
    if "rounds" in summary:
        return "DP-FedAvg", "experiments.fedavg_classifier"
    return "DP-SGD", "experiments.dpsgd_classifier"


def _classifier_result(summary: dict) -> tuple[str, dict]:
    """(method name, eval.json figures) of a directly trained classifier's workdir."""
    model = summary["flags"]["model"]
    algorithm, binary = classifier_trainer(summary)
    return f"{algorithm} {model} (direct)", {
        "fid_domain": None,
        "downstream": {model: {"test_accuracy": summary["test_accuracy"]}},
        "downstream_note": f"The {algorithm} {model} itself, trained on the real train split "
        f"and tested on the real test split by {binary}",
    }


def _write_figures(
    workdir: Workdir,
    method: str,
    synthetic: contract.SyntheticSet | None,
    test: data.ImageDataset,
) -> list[str]:
    written = []
    if synthetic is not None:
        figures.save_class_grid(
            workdir.file(SAMPLES_PNG), synthetic.images, synthetic.labels, test.num_classes,
            title=f"{method}: samples per class",
        )
        figures.save_side_by_side(
            workdir.file(SIDE_BY_SIDE_PNG), (test.images, test.labels),
            (synthetic.images, synthetic.labels), test.num_classes,
            titles=(f"real ({test.name} test)", method),
        )
        written += [SAMPLES_PNG, SIDE_BY_SIDE_PNG]
    if figures.save_curves(workdir.file(CURVES_PNG), workdir.read_metrics(), "training curves"):
        written.append(CURVES_PNG)
    return written


def evaluate(workdir: str | os.PathLike, source: Source, config: EvalConfig) -> dict:
    """Evaluates ``source`` and writes eval.json, figures and a report.md section into
    ``workdir``; returns the eval.json dict.

    Raises:
      EvaluationError: if the source cannot be evaluated.
    """
    if source.kind not in KINDS:
        raise EvaluationError(f"unknown source kind {source.kind!r}; expected one of {KINDS}")
    start = time.time()
    wd = Workdir(workdir)
    summary = _read_optional_json(wd, SUMMARY_FILE)
    if source.kind == "generator":
        _check_image_generator(summary[contract.METHOD_KEY])
    dataset = _dataset_name(config, summary, source.kind)
    privacy = None if source.kind == "real_data" else privacy_of(wd)  # before the work
    train, test = data.load(dataset, "train"), data.load(dataset, "test")
    if source.kind == "classifier":
        synthetic = None
        method, result = _classifier_result(summary)
    else:
        method, synthetic = load_images(source, wd, train, config)
        result = evaluate_images(synthetic, train, test, config)
    record = {
        "method": method,
        "source": dataclasses.asdict(source),
        "dataset": dataset,
        "privacy": privacy,
        **result,
        "train_wall_seconds": summary.get("wall_seconds") if source.kind != "real_data" else None,
        "figures": _write_figures(wd, method, synthetic, test),
        "seed": config.seed,
    }
    record["eval_wall_seconds"] = time.time() - start
    wd.write_json(EVAL_FILE, record)
    _update_report(wd, render_report(record))
    return record


def evaluate_generator(workdir: str | os.PathLike, num_samples: int, seed: int) -> str:
    """Evaluates the generator a training binary just wrote; returns its one-line result.

    The line reads " | fid_domain F | accuracy cnn A%, ..." (to append to the binary's).
    """
    record = evaluate(
        workdir,
        Source("generator", str(workdir)),
        EvalConfig(num_samples=num_samples, seed=seed),
    )
    accuracies = ", ".join(
        f"{name} {100 * r['test_accuracy']:.1f}%" for name, r in record["downstream"].items()
    )
    return f" | fid_domain {record['fid_domain']:.3f} | accuracy {accuracies}"


def _no_privacy(record: dict) -> str:
    """How a record without a privacy guarantee is described."""
    if record["source"]["kind"] == "real_data":
        return "non-private (the real data itself)"
    return "none recorded (no ledger.json: treat as non-private)"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


# The evaluation measures a release with the real data: it is research, not a release.
EVALUATION_NOTE = (
    "These figures are not covered by the privacy guarantee: fid_domain's feature CNN is "
    "trained on the real train split and every figure compares with real data. They measure "
    "the release for research; do not publish them as part of it."
)


def render_report(record: dict) -> str:
    """The report.md section of an evaluation: metrics table and figures."""
    privacy = record["privacy"]
    privacy_line = (
        _no_privacy(record) if privacy is None else
        f"eps {format_upper(privacy['epsilon_rdp'], 3)} (RDP) / "
        f"{format_upper(privacy['epsilon_pld'], 3)} (PLD), delta "
        f"{format_upper(privacy['delta'], 3)}, unit: {privacy['unit'] or 'n/a'}"
    )
    lines = [
        f"## Evaluation: {record['method']} on {record['dataset']}",
        "",
        f"- privacy: {privacy_line}",
    ]
    for key in sorted(k for k in record if k.startswith("fid_") and not k.endswith("_extractor")):
        if record[key] is not None:
            lines.append(
                f"- {key} vs the real test split: **{record[key]:.3f}** "
                f"(features: {record[key + '_extractor']})"
            )
    if record.get("sample_size_note"):
        lines.append(f"- {record['sample_size_note']}.")
    if record.get("downstream"):
        lines += ["", "| classifier | real test accuracy |", "|---|---|"]
        lines += [
            f"| {name} | {_percent(r['test_accuracy'])} |"
            for name, r in record["downstream"].items()
        ]
    lines += ["", f"{record['downstream_note']}.", "", EVALUATION_NOTE, ""]
    lines += [f"![{name}]({name})" for name in record["figures"]]
    return "\n".join(lines) + "\n"


def _update_report(workdir: Workdir, section: str) -> None:
    """Puts ``section`` between markers in report.md, replacing an earlier one and
    keeping whatever the trainer wrote."""
    path = workdir.file("report.md")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    workdir.write_report(with_eval_section(text, section))
