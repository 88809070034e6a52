r"""Finds a tokenization bug in private federated text with DP federated char LMs (P0).

Augenstein et al., "Generative Models for Effective ML on Private, Decentralized
Datasets" (ICLR 2020), text demonstration on Shakespeare (one client per (play, speaker
name), as LEAF); on half of the clients the pipeline drops the space after punctuation.
The app's word vocabulary and the LMs' char vocabulary come from --vocab_plays whole plays
held out of the client population (the last in name order), never from a client's text.
Example (2 CPU cores, 7-15 minutes):

  .venv/bin/python -m experiments.fedlm_debug --workdir=workdirs/fedlm_debug \
    --hidden=128 --rounds=150 --clients_per_round=40 --local_steps=5 --noise_multiplier=0.7

Expected: the LM of the high-OOV clients writes glued tokens ("lord,what"): its samples'
glued-token rate and its top join "x,x" are far above the low-OOV clients' LM
(WORKSPACE.md, "P0 ... language models", has the measured figures and each LM's
user-level eps). report.md has the top-k token tables, OOV and glued rates, the top
joins, sample lines and eps. --group_sampling=population with given thresholds makes the
eps end to end (rounds sample all users; group sizes released noised). The unit of
privacy is one user (client: all of its text); --sampling=poisson (the default) is
accounted under add/remove-one, --sampling=fixed under replace-one. Rerunning the same
command on the same workdir resumes both LMs; a rerun that changes a flag other than
--rounds, --eval_every, --checkpoint_every, --num_sample_lines, --sample_length or --top_k
exits 2 naming it. An empirical check of each LM's accounting: --audit_canaries=1000
(audit.json, one entry per LM; WORKSPACE.md, "Auditing a training run with canaries").
"""

from absl import flags

from dpfed.generative import debug_flags, fedlm_debug, selection
from dpfed.train import cli, dpsgd

_D = fedlm_debug.TextDebugConfig()

_BUG = flags.DEFINE_float("bug_fraction", _D.bug_fraction, "Fraction p of buggy clients.")
_MIN_LINES = flags.DEFINE_integer(
    "min_lines", _D.min_lines, "Drop (play, speaker name) clients with fewer lines.")
_VOCAB_PLAYS = flags.DEFINE_integer(
    "vocab_plays",
    _D.vocab_plays,
    "Plays held out of the clients (the last in name order); the vocabularies come from them.",
)
_MAX_WORDS = flags.DEFINE_integer("max_words", _D.max_words, "The app's word vocabulary.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", _D.seq_len, "Chars per training sequence.")
_MAX_SEQS = flags.DEFINE_integer("max_seqs", _D.max_seqs, "Sequences kept per client.")
_EMBED = flags.DEFINE_integer("embed_dim", _D.embed_dim, "Char embedding width.")
_HIDDEN = flags.DEFINE_integer("hidden", _D.hidden, "LSTM width.")
_LAYERS = flags.DEFINE_integer("num_layers", _D.num_layers, "LSTM layers.")
_LOCAL_STEPS = flags.DEFINE_integer("local_steps", _D.local_steps, "Client SGD steps.")
_LOCAL_BATCH = flags.DEFINE_integer("local_batch_size", _D.local_batch_size, "Sequences/step.")
_CLIENT_LR = flags.DEFINE_float("client_learning_rate", _D.client_learning_rate, "Client lr.")
_SERVER_LR = flags.DEFINE_float("server_learning_rate", _D.server_learning_rate, "Server lr.")
# The split, cohorts, DP, seed and cadence: the settings both debug demos have.
_DEBUG_FLAGS = debug_flags.define_debug_flags(
    _D, model="LM", metric="OOV rate", update="the LM delta")
_LINES = flags.DEFINE_integer("num_sample_lines", _D.num_sample_lines, "Lines sampled per LM.")
_LENGTH = flags.DEFINE_integer("sample_length", _D.sample_length, "Max chars per line.")
_TOP_K = flags.DEFINE_integer("top_k", _D.top_k, "Tokens in the top-k tables.")
_AUDIT = cli.define_audit_flag("users (of each LM)")
_INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()  # multi-host: launch/multihost.py
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "workdir", f"unexpected arguments {argv[1:]}")
    _INITIALIZE_DISTRIBUTED()
    try:
        config = fedlm_debug.TextDebugConfig(
            bug_fraction=_BUG.value,
            min_lines=_MIN_LINES.value,
            vocab_plays=_VOCAB_PLAYS.value,
            max_words=_MAX_WORDS.value,
            seq_len=_SEQ_LEN.value,
            max_seqs=_MAX_SEQS.value,
            embed_dim=_EMBED.value,
            hidden=_HIDDEN.value,
            num_layers=_LAYERS.value,
            local_steps=_LOCAL_STEPS.value,
            local_batch_size=_LOCAL_BATCH.value,
            client_learning_rate=_CLIENT_LR.value,
            server_learning_rate=_SERVER_LR.value,
            num_sample_lines=_LINES.value,
            sample_length=_LENGTH.value,
            top_k=_TOP_K.value,
            audit_canaries=_AUDIT.value,
            **debug_flags.config_fields(_DEBUG_FLAGS),
            **cli.seed_fields(_WORKDIR.value),
        )
        cli.refuse_unused(selection.unused_flags(config))
        summary = fedlm_debug.run(config, _WORKDIR.value)
    except dpsgd.ConfigError as error:
        raise cli.FlagError(error.field, error.message) from error
    print(
        f"OOV rate of {_LINES.value} sampled lines: high-OOV clients' LM "
        f"{summary['oov_rate_buggy_model']:.3f}, low-OOV clients' LM "
        f"{summary['oov_rate_healthy_model']:.3f}; glued tokens "
        f"{summary['glued_rate_buggy_model']:.3f} vs {summary['glued_rate_healthy_model']:.3f} | "
        + selection.eps_headline(summary)
        + f"\nreport: {_WORKDIR.value}/report.md"
    )


if __name__ == "__main__":
    cli.run(main)
