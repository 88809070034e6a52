r"""Evaluates a generator, a synthetic .npz, the real data or a DP-SGD or DP-FedAvg classifier.

Writes eval.json (fid_domain, train-on-synthetic / test-on-real accuracy of CNN, MLP
and logistic regression, eps), PNG figures and an evaluation section of report.md into
--workdir. What is evaluated:
- default: the workdir's generator (summary.json names the method), else its
  synthetic.npz, else its DP-SGD or DP-FedAvg classifier summary (the direct-training
  row: its trainer's test accuracy, so the sampling, fid_domain and downstream flags
  are refused);
- --synthetic=FILE.npz: images (float32 [N,H,W,C] in [0,1]) and labels in that file;
- --real_data: the real train split as if synthetic: the ceiling row.

Example (2 CPU cores: 80 s idle, 3-6 minutes shared, the first time, which trains and caches the
fid_domain extractor; real-data ceiling on mnist5k):

  .venv/bin/python -m experiments.evaluate --real_data --dataset=mnist5k \
    --workdir=workdirs/eval_real_mnist5k

gives CNN 97.6%, MLP 92.8%, LogReg 91.2% and fid_domain 1.02 (WORKSPACE.md, "Evaluation").
"""

from absl import flags

from dpfed import data
from dpfed.eval import classifier_fit, downstream, evaluation, fid, inception
from dpfed.train import cli
from dpfed.train.workdir import Workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to evaluate and write to.", required=True)
_SYNTHETIC = flags.DEFINE_string("synthetic", None, "Evaluate this .npz (images, labels).")
_REAL = flags.DEFINE_bool("real_data", False, "Evaluate the real train split (ceiling row).")
_DATASET = flags.DEFINE_enum(
    "dataset", None, data.list_datasets(), "Real dataset (default: the workdir's summary)."
)
_NUM = flags.DEFINE_integer(
    "num_samples", None, "Synthetic examples (default: the train split's size).", lower_bound=20
)
_SEED = cli.define_seed_flag(0, "Seed of sampling and downstream training.")
_MODELS = flags.DEFINE_multi_enum(
    "models", list(downstream.DOWNSTREAM_MODELS), list(downstream.DOWNSTREAM_MODELS),
    "Downstream classifiers.",
)
_EPOCHS = flags.DEFINE_integer("max_epochs", 15, "Downstream epochs at most.", lower_bound=1)
_PATIENCE = flags.DEFINE_integer("patience", 3, "Early-stopping patience.", lower_bound=1)
_VAL = flags.DEFINE_float(
    "val_fraction", 0.1, "Synthetic fraction held out for early stopping.",
    lower_bound=0.01, upper_bound=0.5,
)
_CACHE = flags.DEFINE_string("cache_dir", None, "fid_domain extractor cache (~/.cache/dpfed).")
_EXTRACTOR_STEPS = flags.DEFINE_integer(
    "extractor_steps", 160, "Training steps of the fid_domain extractor.", lower_bound=1
)
_INCEPTION = flags.DEFINE_string(
    "inception_weights", None, "Inception-v3 FID weights (.npz); adds fid_inception."
)


def _source() -> evaluation.Source:
    cli.check(not (_SYNTHETIC.value and _REAL.value), "real_data", "conflicts with --synthetic")
    if _REAL.value:
        cli.check(_DATASET.value is not None, "dataset", "--real_data needs --dataset")
        return evaluation.Source("real_data")
    if _SYNTHETIC.value:
        return evaluation.Source("synthetic_file", _SYNTHETIC.value)
    try:
        return evaluation.detect_source(Workdir(_WORKDIR.value))
    except evaluation.EvaluationError as error:
        raise cli.FlagError("workdir", str(error)) from error


def _config() -> evaluation.EvalConfig:
    extra: tuple[fid.FeatureExtractor, ...] = ()
    if _INCEPTION.value:
        try:
            extra = (inception.inception_extractor(_INCEPTION.value),)
        except inception.WeightsError as error:
            raise cli.FlagError("inception_weights", str(error)) from error
    return evaluation.EvalConfig(
        dataset=_DATASET.value,
        num_samples=_NUM.value,
        seed=_SEED.value,
        downstream=downstream.DownstreamConfig(
            fit=classifier_fit.FitConfig(max_epochs=_EPOCHS.value, patience=_PATIENCE.value),
            val_fraction=_VAL.value,
        ),
        models=tuple(_MODELS.value),
        cache_dir=_CACHE.value,
        extractor_steps=_EXTRACTOR_STEPS.value,
        extra_extractors=extra,
    )


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "workdir", f"unexpected arguments {argv[1:]}")
    source = _source()
    cli.refuse_unused(evaluation.unused_flags(source))
    config = _config()
    try:
        record = evaluation.evaluate(_WORKDIR.value, source, config)
    except evaluation.DatasetError as error:
        raise cli.FlagError("dataset", str(error)) from error
    except evaluation.EvaluationError as error:
        flag = _SYNTHETIC.name if _SYNTHETIC.value else "workdir"
        raise cli.FlagError(flag, str(error)) from error
    except data.DatasetUnavailableError as error:
        raise cli.FlagError("dataset", str(error)) from error
    results = (record["downstream"] or {}).items()
    accuracies = ", ".join(f"{name} {100 * r['test_accuracy']:.1f}%" for name, r in results)
    fid_domain = record.get("fid_domain")
    print(
        f"{record['method']} on {record['dataset']}: "
        + ("" if fid_domain is None else f"fid_domain {fid_domain:.3f} | ")
        + f"accuracy {accuracies or 'n/a'} | eval.json: {_WORKDIR.value}/eval.json"
    )


if __name__ == "__main__":
    cli.run(main)
