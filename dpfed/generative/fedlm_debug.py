"""Find a tokenization bug in private federated text with DP federated LMs (P0, text).

The text demonstration of "Generative Models for Effective ML on Private, Decentralized
Datasets" (Augenstein et al., ICLR 2020): a tokenization bug on part of the clients, found
by a DP federated LM. The paper's text data is not embedded here: this runs on
Shakespeare (the embedded text dataset; one client per (play, speaker name), as LEAF):
1. the bug: on a fraction p of the clients the text pipeline drops the space after
   punctuation ("my lord,what"), so the app's whitespace tokenizer sees glued tokens;
2. the app's word vocabulary was fixed before the bug, so each client's
   out-of-vocabulary (OOV) rate, computed on its device, rises on buggy clients. It, and
   the LMs' char vocabulary (their output alphabet), come from text outside the client
   population: `vocab_plays` whole plays are held out (`shakespeare.held_out_play_names`)
   and none of their speakers is a client. A vocabulary counted over the clients' own text
   would be an un-noised function of the users' data, outside eps, and one client's words
   would change every other client's OOV rate and so its group: for real private text,
   build vocabularies from public text that no user wrote, as here;
3. the clients with a high OOV rate (the suspicious group) train one DP-FedAvg char LSTM
   LM, the clients with a low OOV rate another;
4. the modeler compares what the two LMs write: top-k tokens with their frequencies,
   the OOV rate and glued-token rate of the samples, the most frequent OOV tokens, and
   sample lines. The suspicious group's LM writes glued tokens ("lord,what"): the bug.
Each LM trains in its own sub-workdir (`lm_high_oov/`, `lm_low_oov/`: ledger, metrics,
diagnostics, checkpoints); the top level holds
- the releases (`dpfed.train.workdir`): summary.json (eps, the samples' statistics, group
  sizes, settings), samples.json (the LMs' sampled lines) and report.md;
- an audit run's (`audit_canaries`) `audit.json`: each LM's canary audit (`audit_lms`);
- `diagnostics.json`: the simulation's ground truth and figures computed from raw client
  data (which clients are buggy, the groups' real text, per-client OOV rates, quantile
  thresholds). Not a DP release, not covered by the guarantee; the report shows them in a
  section of their own so the demo can check itself.
Rerunning resumes both LMs; the top level's config.json pins the settings, so a rerun with
a changed setting (other than `RESUMABLE_FIELDS`) is refused instead of resuming LMs
trained on another population.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from dpfed import data as data_lib
from dpfed.data import bugs, shakespeare
from dpfed.data import text as text_lib
from dpfed.federated import describe_user_level_privacy
from dpfed.generative import fedlm, group_sizes, selection
from dpfed.models.lstm_lm import LstmLM
from dpfed.train import run_clock, seeds
from dpfed.train import workdir as workdir_lib
from dpfed.train.config import (
    require,
    require_audit_applies,
    require_finite_floats,
    require_secret_seed,
)
from dpfed.train.workdir import AUDIT_FILE, Workdir, params_sha256

GROUPS = ("high_oov", "low_oov")
# What a rerun on the same workdir may change: how long the LMs train, how often they
# report, and how the released LMs are sampled and summarised (post-processing).
RESUMABLE_FIELDS = workdir_lib.RESUMABLE_FIELDS | {"num_sample_lines", "sample_length", "top_k"}


@dataclasses.dataclass(frozen=True)
class TextDebugConfig:
    """Everything that defines a run of the text debugging demo (the binary's flags)."""

    bug_fraction: float = 0.5
    min_lines: int = 20
    vocab_plays: int = 4
    max_words: int = 10000
    low_quantile: float = selection.DEFAULT_LOW_QUANTILE
    high_quantile: float = selection.DEFAULT_HIGH_QUANTILE
    low_threshold: float | None = None
    high_threshold: float | None = None
    seq_len: int = 80
    max_seqs: int = 32
    embed_dim: int = 8
    hidden: int = 256
    num_layers: int = 1
    local_steps: int = 4
    local_batch_size: int = 8
    client_learning_rate: float = 1.0
    server_learning_rate: float = 1.0
    rounds: int = 200
    clients_per_round: float = 10
    sampling: str = "poisson"
    group_sampling: str = "group"
    group_size_noise: float = group_sizes.DEFAULT_GROUP_SIZE_NOISE
    l2_clip: float = 1.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    num_sample_lines: int = 400
    sample_length: int = 120
    top_k: int = 15
    seed: int = 0
    secret_seed: bool = False  # seed drawn by `Workdir.pin_seed`; releases say "secret"
    eval_every: int = 50
    checkpoint_every: int = 50
    audit_canaries: int = 0  # ~K canary users of each LM, ~K held out: `audit_lms`

    def __post_init__(self):
        require_finite_floats(self)
        require_secret_seed(self)
        require_audit_applies(self.audit_canaries, self.noise_multiplier == 0, self.sampling,
                              "--noise_multiplier=0")
        require(0.0 <= self.bug_fraction <= 1.0, "bug_fraction", "must be in [0, 1]")
        require(self.min_lines >= 2, "min_lines", "must be >= 2")
        require(
            self.vocab_plays >= 1,
            "vocab_plays",
            "must be >= 1: the vocabularies need text outside the client population",
        )
        require(
            0.0 <= self.low_quantile < self.high_quantile <= 1.0,
            "low_quantile",
            "need 0 <= low_quantile < high_quantile <= 1",
        )
        for name in (
            "max_words",
            "max_seqs",
            "embed_dim",
            "hidden",
            "num_layers",
            "local_steps",
            "local_batch_size",
            "rounds",
            "num_sample_lines",
            "sample_length",
            "top_k",
            "eval_every",
            "checkpoint_every",
        ):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.seq_len >= 2, "seq_len", "must be >= 2")
        for name in ("client_learning_rate", "server_learning_rate"):
            require(getattr(self, name) > 0, name, "must be > 0")
        selection.check_training_settings(self)
        if self.low_threshold is not None and self.high_threshold is not None:
            require(
                self.low_threshold < self.high_threshold,
                "low_threshold",
                "must be below --high_threshold",
            )

    def lm_config(self, vocab_size: int) -> fedlm.FedLmConfig:
        """One LM's federated training settings (the same for both groups)."""
        model = LstmLM(vocab_size, self.embed_dim, self.hidden, self.num_layers)
        return fedlm.FedLmConfig(
            local=fedlm.LocalTrainingConfig(
                model, self.local_steps, self.local_batch_size, self.client_learning_rate
            ),
            rounds=self.rounds,
            clients_per_round=self.clients_per_round,
            sampling=self.sampling,
            l2_clip=self.l2_clip,
            noise_multiplier=self.noise_multiplier,
            server_learning_rate=self.server_learning_rate,
            delta=self.delta,
            seed=self.seed,
            secret_seed=self.secret_seed,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            audit_canaries=self.audit_canaries,
        )


def audit_lms(results: dict[str, dict]) -> dict[str, dict] | None:
    """audit.json of an audit run: {"lm_<group>": that LM's `audit.audit_run`} for each
    group's LM summary in `results` (by group name) that holds one; None without any.

    Each LM is its own DP-FedAvg release, with its own ledger (the unit: one user of its
    group) and its own canaries, drawn from its own seed (`selection.group_seed`) in its
    own parameter space: each entry audits one LM against that LM's ledger eps.
    """
    audits = {f"lm_{name}": result["audit"] for name, result in results.items()
              if "audit" in result}
    return audits or None


def vocabularies(
    plays: shakespeare.ShakespeareData, max_words: int
) -> tuple[text_lib.Vocabulary, text_lib.Vocabulary]:
    """The app's word vocabulary and the LMs' char vocabulary, from the held-out plays.

    Only `plays.held_out_text` is read, never a client's text: both vocabularies, and so
    each client's OOV rate and group (given thresholds), do not depend on other clients.
    """
    if not plays.held_out_text:
        raise ValueError("no held-out play: the vocabularies must not come from client text")
    word_vocab = fedlm.word_vocabulary(plays.held_out_text, max_words)
    char_vocab = fedlm.char_vocabulary(plays.held_out_text)
    return word_vocab, char_vocab


def require_window_holds_a_line(public_texts: Sequence[str], window: int) -> None:
    """Refuses a window (`seq_len` x `max_seqs` chars) that holds no whole line of the
    held-out plays, whose every client would train on nothing (zero updates).

    Only public text is read: a refusal on the clients' own lines would be a release (in
    one population a group's client has a short line and the run goes on, in its
    neighbour it is longer and the run stops); a client whose first line does not fit
    trains on nothing, counted in a raw-data terminal line.
    """
    shortest = min((line for text in public_texts for line in text.splitlines()
                    if line.strip()), key=len)
    require(fedlm.line_ids(shortest) <= window, "max_seqs",
            f"seq_len x max_seqs = {window} chars hold no whole line, not even the held-out "
            f"plays' shortest ({len(shortest)} chars): raise --max_seqs or --seq_len")


def chars_outside(texts: list[str], char_vocab: text_lib.Vocabulary) -> tuple[int, int]:
    """(chars of `texts` not in `char_vocab`, all chars), newlines not counted.

    The LMs see such a char as `<oov>` and never sample it.
    """
    known = set(char_vocab.tokens)
    chars = [char for t in texts for char in t if char != "\n"]
    return sum(char not in known for char in chars), len(chars)


def run(config: TextDebugConfig, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) the whole text demo in `workdir`; returns the summary dict."""
    started = time.time()
    num_plays = len(shakespeare.play_names())
    require(
        config.vocab_plays < num_plays,
        "vocab_plays",
        f"must be < {num_plays}: at least one of the {num_plays} plays must stay for the clients",
    )
    wd = Workdir(workdir)
    group_dirs = [f"lm_{name}" for name in GROUPS]
    selection.pin_demo_config(wd, config, group_dirs, RESUMABLE_FIELDS)
    plays = data_lib.load_shakespeare(min_lines=config.min_lines, num_held_out=config.vocab_plays)
    word_vocab, char_vocab = vocabularies(plays, config.max_words)
    window = config.seq_len * config.max_seqs  # chars of a client's stream kept
    require_window_holds_a_line(plays.held_out_text, window)
    texts, buggy = bugs.inject_text_bug(plays.train, config.bug_fraction, config.seed)
    oov_rates = fedlm.client_oov_rates(texts, word_vocab)
    chars_oov, chars_total = chars_outside(texts, char_vocab)
    # The number of clients N is public (WORKSPACE.md, "The privacy ledger"); whether one
    # has a word is not, so with population sampling and given thresholds a population
    # where none has one trains two empty groups, as `split_clients` allows.
    require(
        len(texts) > 0,
        "min_lines",
        f"leaves no client: no (play, speaker name) has {config.min_lines} lines or more "
        "(lower it)",
    )
    groups = selection.split_clients(
        oov_rates, eligible=~np.isnan(oov_rates), **selection.split_settings(config))
    members = {"high_oov": groups.high, "low_oov": groups.low}
    log(
        f"{selection.RAW_LOG_PREFIX}{len(texts)} clients; OOV rate thresholds low <= "
        f"{groups.low_threshold:.3f}, high >= {groups.high_threshold:.3f}: "
        f"{groups.low.sum()} and {groups.high.sum()} clients; {chars_oov} of their "
        f"{chars_total} chars are outside the char vocabulary (<oov>)"
    )
    lm_config = config.lm_config(char_vocab.size)
    sample_key = seeds.stream_key(config.seed, selection.SAMPLE_STREAM)
    results, samples, ground_truth, lm_summaries = {}, {}, {}, {}
    group_texts_of = {
        name: [t for t, m in zip(texts, members[name], strict=True) if m] for name in GROUPS
    }
    selection.pin_groups(
        wd, {name: params_sha256(t) for name, t in group_texts_of.items()}, group_dirs, "workdir"
    )
    # Both groups' cohorts are checked before either LM trains: a check failing on the
    # second group after the first trained would leave a workdir whose corrected rerun
    # is refused (`pin_demo_config`).
    sizes = {name: len(group_texts_of[name]) for name in GROUPS}
    group_sizes.require_cohorts_fit(config, sizes, len(texts), lambda name: f"{name} group")
    kept_of, sequences_of = {}, {}
    for name in GROUPS:
        group_texts = group_texts_of[name]
        # A client keeps the whole lines that fit in seq_len x max_seqs chars: none when
        # its first line is longer. Such a client trains on nothing (a zero update).
        kept_of[name] = [fedlm.truncate_lines(text, window) for text in group_texts]
        sequences_of[name] = fedlm.client_sequences(
            kept_of[name], char_vocab, config.seq_len, config.max_seqs)
    subpopulations, sizes_ledger = group_sizes.group_subpopulations(
        wd, config, sizes, len(texts), "OOV rates", log)
    for name in GROUPS:
        group_texts, kept = group_texts_of[name], kept_of[name]
        ids, counts = sequences_of[name]
        kept_fraction = sum(map(len, kept)) / max(sum(map(len, group_texts)), 1)
        log(f"{selection.RAW_LOG_PREFIX}the {name} group's LM trains on {kept_fraction:.1%} "
            f"of its clients' text (the whole lines that fit in {window} chars a client)")
        empty = int(np.sum(counts == 0))
        if empty:
            log(f"{selection.RAW_LOG_PREFIX}{empty} of {len(counts)} clients of the {name} "
                f"group have no line that fits in seq_len x max_seqs = {window} chars: they "
                "train on nothing")
        summary, params = fedlm.train_lm(
            dataclasses.replace(lm_config, seed=selection.group_seed(config.seed, name),
                                subpopulation=subpopulations[name]),
            ids,
            counts,
            char_vocab,
            word_vocab,
            wd.file(f"lm_{name}"),
            group=name,
            log=log,
        )
        lm_summaries[name] = summary
        sampled = fedlm.sample_ids(
            lm_config.local.model,
            params,
            sample_key,
            config.num_sample_lines,
            config.sample_length,
        )
        lines = fedlm.decode_lines(np.asarray(sampled), char_vocab)
        stats = fedlm.token_stats(lines, word_vocab, config.top_k)
        real = fedlm.token_stats(kept, word_vocab, config.top_k)  # The text it trained on.
        samples[name] = lines
        # With --group_sampling=group the group sizes are released without noise, though
        # they count users whose raw OOV rate passes a threshold: the group's accounting
        # needs them (q = m / N, in its ledger); guarantee_caveat says so.
        results[name] = {
            **group_sizes.group_size_fields(
                sizes[name], subpopulations[name], sizes_ledger, Workdir(wd.file(f"lm_{name}"))),
            "oov_rate": stats.oov_rate,
            "glued_rate": stats.glued_rate,
            "top_k": stats.top_k,
            "top_oov": stats.top_oov,
            "top_glue": stats.top_glue,
            "num_sample_tokens": stats.num_tokens,
            **selection.model_fields(summary),
        }
        ground_truth[name] = {
            "num_clients": sizes[name],
            "buggy_client_fraction": selection.mean_or_nan(buggy[members[name]]),
            "client_oov_rate_mean": selection.mean_or_nan(oov_rates[members[name]]),
            "real_oov_rate": real.oov_rate,
            "real_glued_rate": real.glued_rate,
            "kept_char_fraction": kept_fraction,
        }
    diagnostics = selection.demo_diagnostics(
        ground_truth, buggy, groups,
        # Client chars the held-out plays lack: the LMs see <oov> and never sample it.
        client_chars_outside_char_vocabulary=chars_oov, client_chars=chars_total)
    summary = {
        "method": "fedlm_debug",
        "oov_rate_buggy_model": results["high_oov"]["oov_rate"],
        "oov_rate_healthy_model": results["low_oov"]["oov_rate"],
        "glued_rate_buggy_model": results["high_oov"]["glued_rate"],
        "glued_rate_healthy_model": results["low_oov"]["glued_rate"],
        "lm_high_oov": results["high_oov"],
        "lm_low_oov": results["low_oov"],
        # The vocabularies' source: whole plays no client comes from (settings, not data).
        "vocabulary_plays": list(plays.held_out_plays),
        "word_vocabulary_size": word_vocab.size - len(text_lib.SPECIAL_TOKENS),
        "char_vocabulary_size": char_vocab.size - len(text_lib.SPECIAL_TOKENS),
        **selection.summary_fields(config, results, started, "OOV rates", len(texts)),
    }
    audits = audit_lms(lm_summaries)
    if audits is not None:
        summary["audit"] = audits
        wd.write_json(AUDIT_FILE, audits)
    wd.write_json("samples.json", samples)
    wd.write_json(selection.DIAGNOSTICS_JSON, diagnostics)
    wd.write_summary(summary)
    wd.write_report(render_report(config, summary, samples, diagnostics))
    return summary


def _token_table(high: list, low: list) -> str:
    rows = [
        "| rank | high-OOV clients' LM | freq. | low-OOV clients' LM | freq. |",
        "|---|---|---|---|---|",
    ]
    for i in range(max(len(high), len(low))):
        h = high[i] if i < len(high) else ("", None)
        lo = low[i] if i < len(low) else ("", None)
        rows.append(f"| {i + 1} | `{h[0]}` | {_pct(h[1])} | `{lo[0]}` | {_pct(lo[1])} |")
    return "\n".join(rows)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def render_report(config: TextDebugConfig, summary: dict, samples: dict, diagnostics: dict) -> str:
    """report.md: top-k tables, OOV and glued rates, sample lines, eps.

    The release sections read only `summary` and `samples`; the simulation's ground truth
    (from `diagnostics`, raw client data) gets a section of its own, labelled as not a
    release.
    """
    high, low = summary["lm_high_oov"], summary["lm_low_oov"]
    buggy_clients = f"{diagnostics['num_buggy_clients']} of the {summary['num_clients']}"
    threshold_note = (
        "A quantile threshold is a function of all clients' raw OOV rates (a simulation "
        "convenience, not a DP release; give --low_threshold/--high_threshold for on-device "
        "selection)."
        if summary["thresholds_from_quantiles"]
        else "The thresholds were given: each client decides its group on its own device."
    )
    low_rule, high_rule = selection.threshold_rules(config, summary, "OOV rate", "OOV rates")
    vocab_plays = summary["vocabulary_plays"]
    vocab_note = (
        f"The word vocabulary and the LMs' {summary['char_vocabulary_size']}-char alphabet were "
        f"built from {len(vocab_plays)} held-out plays, not in the client population: "
        f"{', '.join(vocab_plays)}; so neither depends on a client's text, and each client's "
        "OOV rate depends on its own text only."
    )
    char_note = (
        f"{diagnostics['client_chars_outside_char_vocabulary']} of the clients' "
        f"{diagnostics['client_chars']:,} chars are not in the held-out plays' alphabet (the "
        "LMs see `<oov>` and never sample it)."
    )
    max_eps_line = selection.max_epsilon_line(summary)
    # Each model's canary-audit line, a sub-item of its privacy line ("" without an audit).
    audits = {f"lm_{name}": selection.audit_line(summary, f"lm_{name}") for name in GROUPS}

    def lines(name):
        return "\n".join(f"    {line}" for line in samples[name][:12])

    diverged = [g for g in GROUPS if summary[f"lm_{g}"].get("diverged")]
    diverged_line = (
        f"\n**The {' and the '.join(g.replace('_', '-') for g in diverged)} clients' LM "
        "diverged** (NaN or inf in its parameters or loss; smaller learning rates?): its samples "
        "say nothing about the clients' text.\n" if diverged else "")
    rows = selection.table_rows([
        group_sizes.size_row(config, low),
        ("OOV rate of the LM's samples", "oov_rate", ".3f"),
        ("glued-token rate of the LM's samples", "glued_rate", ".3f"),
        ("LM wall time (s)", "wall_seconds", ".0f"),
    ], high, low)
    truth_high, truth_low = diagnostics["groups"]["high_oov"], diagnostics["groups"]["low_oov"]
    truth_rows = selection.table_rows([
        ("truly buggy clients", "buggy_client_fraction", ".3f"),
        ("mean client OOV rate (on device)", "client_oov_rate_mean", ".3f"),
        ("OOV rate of the real text the LM trains on", "real_oov_rate", ".3f"),
        ("glued-token rate of the real text the LM trains on", "real_glued_rate", ".3f"),
        ("share of the group's text the LM trains on", "kept_char_fraction", ".3f"),
    ], truth_high, truth_low)
    return f"""# Debugging private, decentralized text with DP federated LMs

Augenstein et al., "Generative Models for Effective ML on Private, Decentralized Datasets"
(ICLR 2020), text demonstration, on Shakespeare: {summary["num_clients"]} clients (one per
play and speaker name, as LEAF); on {config.bug_fraction:.0%} of them the text pipeline drops
the space after punctuation. Each client computes its out-of-vocabulary rate under the app's
whitespace tokenizer and its {summary["word_vocabulary_size"]:,}-word vocabulary; clients with
{high_rule} train one DP-FedAvg char LSTM LM, clients with
{low_rule} another. The models are char-level so they can spell tokens no vocabulary
anticipated. {threshold_note} {vocab_note}

| | high-OOV clients' LM | low-OOV clients' LM |
|---|---|---|
{rows}
{diverged_line}
## Top {config.top_k} tokens of {config.num_sample_lines} sampled lines

{_token_table(high["top_k"], low["top_k"])}

## Top {config.top_k} out-of-vocabulary tokens of the samples

{_token_table(high["top_oov"], low["top_oov"])}

## Top joins of glued tokens in the samples

Glued tokens ("lord,what") are too diverse for one of them to rank high; their joins
(letters shown as x) are counted here, relative to all sampled tokens. An empty cell: the
LM wrote no such token.

{_token_table(high["top_glue"], low["top_glue"])}

## Sample lines

High-OOV clients' LM:

{lines("high_oov")}

Low-OOV clients' LM:

{lines("low_oov")}

## Privacy

Unit: one **user** (client). Only each client's clipped LM delta leaves it, noised in the sum.
- high-OOV LM: {describe_user_level_privacy(high, config.delta)}{audits["lm_high_oov"]}
- low-OOV LM: {describe_user_level_privacy(low, config.delta)}{audits["lm_low_oov"]}
- {max_eps_line}

## Settings and the paper

{config.rounds} rounds, {config.clients_per_round:g} clients per round ({config.sampling},
{group_sizes.describe_group_sampling(config)}), clip
{config.l2_clip:g}, noise multiplier {config.noise_multiplier:g}; LSTM {config.num_layers} x
{config.hidden}, embedding {config.embed_dim}; {config.local_steps} local steps of
{config.local_batch_size} sequences of {config.seq_len} chars (SGD lr
{config.client_learning_rate:g}), server SGD with momentum 0.9 (lr
{config.server_learning_rate:g}); seed {seeds.public(config)};
wall time {run_clock.describe(summary)}.
The paper trained a DP federated RNN on the suspicious users and showed that its generated
tokens exposed the tokenization bug, compared with a model of healthy users (PAPERS.md: no
number of theirs is quoted here).

## Simulation ground truth and diagnostics (not a DP release)

These figures are computed from the raw client data: they are not covered by the privacy
guarantee, are written to `{selection.DIAGNOSTICS_JSON}` (each LM's per-round cohort figures to
`lm_high_oov/diagnostics.jsonl` and `lm_low_oov/diagnostics.jsonl`), and must not be
published with the release. {buggy_clients} clients are truly buggy; the split used
OOV rate >= {diagnostics["high_threshold"]:.3f} and <= {diagnostics["low_threshold"]:.3f}.
{char_note}

| | high-OOV group | low-OOV group |
|---|---|---|
| clients | {truth_high["num_clients"]} | {truth_low["num_clients"]} |
{truth_rows}
"""
