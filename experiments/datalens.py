r"""Trains DataLens (Wang et al., CCS 2021): T teacher discriminators voting with TopAgg
for a student generator; writes the workdir contract and evaluates the synthetic set.

Example (the mnist5k eps=10 row, T=1000 teachers):

  .venv/bin/python -m experiments.datalens \
    --flagfile=launch/tables/datalens/03_datalens_eps10.flags --evaluate \
    --workdir=workdirs/datalens_eps10

Measured figures (eps, fid_domain, train-on-synthetic accuracy) are in WORKSPACE.md,
"DataLens". Training stops before the generator step that would take eps above
--target_epsilon. Privacy: the unit is one training example, under the neighbouring
relation of --partition (hash: add/remove-one; balanced: replace-one), which assigns each
example to one teacher. Rerunning the same command on the same workdir resumes from its
last checkpoint, privacy ledger included. An empirical check of the accounting:
--audit_canaries=1000 (canary teachers' votes in every step's vote sum, audit.json: the
figures of every step's release, `dpfed.generative.datalens.canaries`; the generator
then holds the canaries: not for release). With --evaluate (the default) the generator is then
evaluated by `dpfed.eval.evaluation` (fid_domain, CNN/MLP/LogReg accuracy on the real
test split) with --num_synthetic samples; `launch/reproduce.py --table=datalens` runs
the rows with --noevaluate and evaluates them with `experiments.evaluate`.

The teachers are sharded over every device of the job; with --distributed (a multi-host
job, `launch/multihost.py`) over the devices of all hosts, e.g. on this machine:

  .venv/bin/python -m launch.multihost local --num_processes=2 -- experiments.datalens \
    --flagfile=launch/tables/datalens/03_datalens_eps10.flags --workdir=workdirs/dl_2hosts
"""

from absl import flags

from dpfed import data, privacy
from dpfed.federated import mesh
from dpfed.generative import datalens
from dpfed.train import cli, seeds

_D = datalens.DataLensConfig()

_DATASET = flags.DEFINE_enum("dataset", _D.dataset, data.list_datasets(), "Dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir for tfds datasets.")
_T = flags.DEFINE_integer("num_teachers", _D.num_teachers, "Number of teachers T.")
_PARTITION = flags.DEFINE_enum(
    "partition", _D.partition, list(datalens.PARTITION_RELATIONS),
    "hash: add/remove-one; balanced: replace-one (dpfed.generative.datalens.partition).",
)
_K = flags.DEFINE_integer("topk", _D.topk, "Non-zeros k of each teacher's vote.")
_SIGMA = flags.DEFINE_float("sigma", _D.sigma, "Noise std on each coordinate of the vote sum.")
_BETA = flags.DEFINE_float("beta", _D.beta, "Threshold beta: aggregate is 0 within +-beta*T.")
_SCOPE = flags.DEFINE_enum(
    "vote_scope", _D.vote_scope, list(datalens.VOTE_SCOPES),
    "sample: each teacher votes on each generated sample (batch_size aggregations per step; "
    "the paper and its public code); batch: one k-sparse vote on the whole batch (one "
    "aggregation per step; our variant, the table rows' setting).",
)
_B = flags.DEFINE_float("grad_bound", _D.grad_bound, "Clip bound b of the stochastic sign.")
_Z = flags.DEFINE_integer("z_dim", _D.z_dim, "Latent dimension of the generator.")
_D_STEPS = flags.DEFINE_integer("d_steps", _D.d_steps, "Teacher steps per generator step.")
_PRETRAIN = flags.DEFINE_integer(
    "pretrain_steps", _D.pretrain_steps, "Teacher steps before the first generator step."
)
_BATCH = flags.DEFINE_integer(
    "batch_size", _D.batch_size, "Generated samples per generator step."
)
_REAL_BATCH = flags.DEFINE_integer(
    "real_batch", _D.real_batch,
    "Real examples per teacher per step (0: whole partition, with --partition=balanced).",
)
_LR = flags.DEFINE_float("learning_rate", _D.learning_rate, "Student Adam learning rate.")
_TEACHER_LR = flags.DEFINE_float(
    "teacher_learning_rate", _D.teacher_learning_rate, "Teacher Adam learning rate."
)
_BETA1 = flags.DEFINE_float("adam_beta1", _D.adam_beta1, "Adam beta1 (student and teachers).")
_STEP_SIZE = flags.DEFINE_float(
    "step_size", _D.step_size, "Student target: G(z) + step_size * aggregate."
)
_PROJECT = flags.DEFINE_bool(
    "project_target", _D.project_target, "Clip the student's target to the image range [0, 1]."
)
_STEPS = flags.DEFINE_integer("steps", _D.steps, "Generator steps at most.")
_TARGET = flags.DEFINE_float("target_epsilon", None, "Stop before eps would exceed this.")
_DELTA = flags.DEFINE_float("delta", _D.delta, "delta of the (eps, delta) guarantee.")
_FEATURES = flags.DEFINE_list(
    "teacher_features", [str(f) for f in _D.teacher_features], "Teacher conv widths."
)
_GEN_HIDDEN = flags.DEFINE_integer("generator_hidden", _D.generator_hidden, "Generator dense.")
_GEN_WIDTH = flags.DEFINE_integer("generator_width", _D.generator_width, "Generator conv width.")
_GEN_BIAS = flags.DEFINE_float(
    "generator_output_bias", _D.generator_output_bias,
    "Initial bias of the generator's output logits (-3: dark images at start).",
)
_GEN_OUTPUT = flags.DEFINE_enum(
    "generator_output", _D.generator_output, list(datalens.GENERATOR_OUTPUTS),
    "Generator output activation (hard_sigmoid reaches exact 0/1 pixels).",
)
_CHUNK = flags.DEFINE_integer(
    "teacher_chunk", _D.teacher_chunk, "Teachers vectorised together (bounds memory)."
)
cli.define_seed_flag(_D.seed)
cli.define_secret_seed_flag()
_EVAL_EVERY = flags.DEFINE_integer("eval_every", _D.eval_every, "Log metrics every N steps.")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Checkpoint period.")
_NUM_SYNTHETIC = flags.DEFINE_integer(
    "num_synthetic", _D.num_synthetic, "Synthetic samples written and evaluated."
)
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Evaluate the generator when training ends.")
_AUDIT = cli.define_audit_flag("teachers (votes in the vote space)")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into this many JAX devices, the teachers sharded over "
    "them (on a CPU-only machine: its core count; 0: JAX's default). Not pinned: a run may "
    "resume with another count.", lower_bound=0,
)
_INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def _config() -> datalens.DataLensConfig:
    try:
        features = tuple(int(f) for f in _FEATURES.value)
    except ValueError as error:
        raise cli.FlagError("teacher_features", "must be a list of integers") from error
    return datalens.DataLensConfig(
        dataset=_DATASET.value,
        num_teachers=_T.value,
        partition=_PARTITION.value,
        topk=_K.value,
        sigma=_SIGMA.value,
        beta=_BETA.value,
        vote_scope=_SCOPE.value,
        grad_bound=_B.value,
        z_dim=_Z.value,
        d_steps=_D_STEPS.value,
        pretrain_steps=_PRETRAIN.value,
        batch_size=_BATCH.value,
        real_batch=_REAL_BATCH.value or None,
        learning_rate=_LR.value,
        teacher_learning_rate=_TEACHER_LR.value,
        adam_beta1=_BETA1.value,
        step_size=_STEP_SIZE.value,
        project_target=_PROJECT.value,
        steps=_STEPS.value,
        target_epsilon=_TARGET.value,
        delta=_DELTA.value,
        teacher_features=features,
        generator_hidden=_GEN_HIDDEN.value,
        generator_width=_GEN_WIDTH.value,
        generator_output_bias=_GEN_BIAS.value,
        generator_output=_GEN_OUTPUT.value,
        teacher_chunk=_CHUNK.value,
        **cli.seed_fields(_WORKDIR.value),
        eval_every=_EVAL_EVERY.value,
        checkpoint_every=_CKPT_EVERY.value,
        num_synthetic=_NUM_SYNTHETIC.value,
        data_dir=_DATA_DIR.value,
        audit_canaries=_AUDIT.value,
    )


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "workdir", f"unexpected arguments {argv[1:]}")
    mesh.split_cpu(_CPU_DEVICES.value)
    _INITIALIZE_DISTRIBUTED()
    try:
        config = _config()
        summary = datalens.train(config, _WORKDIR.value)
    except datalens.ConfigError as error:
        raise cli.FlagError(error.field, error.message) from error
    except data.DatasetUnavailableError as error:
        raise cli.FlagError("dataset", str(error)) from error
    line = (
        f"eps {privacy.format_upper(summary['epsilon_rdp'])} (RDP), delta {config.delta:g} after "
        f"{summary['steps']} steps ({summary['aggregations']} aggregations)"
    )
    if _EVALUATE.value:
        from dpfed.eval import evaluation

        line += evaluation.evaluate_generator(
            _WORKDIR.value, config.num_synthetic, seeds.evaluation_seed(config))
    print(f"{line} | report: {_WORKDIR.value}/report.md")


if __name__ == "__main__":
    cli.run(main)
