"""Federated character-level LSTM LM for debugging a text pipeline (P0, text).

"Generative Models for Effective ML on Private, Decentralized Datasets" (Augenstein et
al., ICLR 2020), second demonstration: a tokenization bug hits part of the clients; an
LSTM LM trained with DP-FedAvg on the suspicious clients generates text whose tokens
(top-k frequencies, out-of-vocabulary rate) reveal the bug, compared with a model of
healthy clients.

Why character level. The bug creates tokens nobody anticipated ("lord,what" when a
client pipeline drops the space after punctuation, `dpfed.data.bugs`). A word-level
LM has a fixed vocabulary built before the bug, so it can only emit `<oov>` for such
tokens: it would show *that* something is out of vocabulary, never *what*. A char LM
spells whatever its clients wrote, so its samples contain the glued tokens themselves
(the LEAF Shakespeare benchmark also models characters).

The app's word view of text is `tokenize_whitespace` (split on whitespace, strip the
punctuation around a token, lowercase): the tokenizer whose vocabulary defines the
out-of-vocabulary (OOV) rate. On healthy text it gives the words of
`dpfed.data.text.tokenize_words`; on buggy text it gives "lord,what".

Building blocks here: char vocabulary and padded client streams, the per-client
next-char loss and local SGD update (only the LM's delta leaves a client), sampling,
and the token statistics of samples.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpfed.data import text as text_lib
from dpfed.federated import (
    ClientData,
    ClientOutput,
    ClientUpdateFn,
    DpFedAvg,
    DpFedAvgConfig,
    OneClient,
    ServerState,
    Subpopulation,
    client_data,
    run_rounds,
    write_privacy_summary,
)
from dpfed.models.lstm_lm import LstmLM
from dpfed.privacy import audit
from dpfed.train import seeds
from dpfed.train.canary_audit import draw_canaries, engine_canaries, write_audit
from dpfed.train.config import require_audit_applies, require_finite_floats, require_secret_seed
from dpfed.train.workdir import Workdir, environment_info, params_sha256

PyTree = Any

PUNCTUATION = ",.;:!?"
PARAMS_FILE = "lm.msgpack"
_STRIP = "\"'()[]-—_" + PUNCTUATION
# A letter, punctuation, (opening quotes/brackets,) a letter: the trace of a dropped space.
_GLUED = re.compile(f"[^\\W\\d_][{re.escape(PUNCTUATION)}]+[\"'(\\[]*[^\\W\\d_]")


def tokenize_whitespace(text: str) -> list[str]:
    """The app's word tokenizer: whitespace split, outer punctuation stripped, lowercase.

    "My lord, what?" -> ["my", "lord", "what"]; "My lord,what?" -> ["my", "lord,what"].
    """
    tokens = (token.strip(_STRIP).lower() for token in text.split())
    return [token for token in tokens if token]


def is_glued(token: str) -> bool:
    """True for a token with punctuation between letters ("lord,what"): the bug's mark."""
    return _GLUED.search(token) is not None


def glue_patterns(token: str) -> list[str]:
    """The joins of a glued token with its letters replaced by "x": "lord,what" -> ["x,x"].

    Glued tokens are too diverse for any one of them to rank high; their joins are not,
    so the top joins are how a top-k table shows the bug.
    """
    return [f"x{match.group(0)[1:-1]}x" for match in _GLUED.finditer(token)]


def char_vocabulary(texts: Iterable[str], max_chars: int = 200) -> text_lib.Vocabulary:
    """The char vocabulary of (public) `texts`: specials + the `max_chars` most frequent."""
    return text_lib.Vocabulary.from_texts(texts, max_chars, tokenizer=text_lib.tokenize_chars)


def word_vocabulary(texts: Iterable[str], max_words: int) -> text_lib.Vocabulary:
    """The app's word vocabulary (`tokenize_whitespace`), fixed before the bug."""
    return text_lib.Vocabulary.from_texts(texts, max_words, tokenizer=tokenize_whitespace)


def line_ids(line: str) -> int:
    """How many ids one line takes in a client's char stream: `<bos>`, its chars, `<eos>`."""
    return len(line) + 2


def truncate_lines(text: str, max_ids: int) -> str:
    """The longest prefix of whole lines whose char stream (`<bos> line <eos>`) fits.

    Bounds a client's padded array explicitly (`to_padded_sequences` refuses to drop).
    """
    kept, used = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        cost = line_ids(line)
        if used + cost > max_ids:
            break
        kept.append(line)
        used += cost
    return "\n".join(kept)


def client_sequences(
    texts: Sequence[str], vocab: text_lib.Vocabulary, seq_len: int, max_seqs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Padded char-id sequences `[clients, max_seqs, seq_len]` and counts `[clients]`.

    Each client's text is cut to the whole lines that fit in `max_seqs` sequences.
    """
    trimmed = [truncate_lines(text, max_seqs * seq_len) for text in texts]
    return text_lib.to_padded_sequences(
        trimmed, vocab, seq_len, tokenizer=text_lib.tokenize_chars, max_seqs=max_seqs
    )


def sequence_loss(params: PyTree, model: LstmLM, ids: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the non-padding targets of `ids` `[B, T]`."""
    logits = model.apply(params, ids[:, :-1])
    targets = ids[:, 1:]
    mask = (targets != text_lib.PAD_ID).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@dataclasses.dataclass(frozen=True)
class LocalTrainingConfig:
    """The client half of a DP-FedAvg LM round.

    Attributes:
      model: the LM.
      local_steps: SGD steps per client per round.
      batch_size: sequences per local step.
      learning_rate: client SGD learning rate.
    """

    model: LstmLM
    local_steps: int = 4
    batch_size: int = 8
    learning_rate: float = 1.0

    def __post_init__(self):
        require_finite_floats(self)
        if self.local_steps < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError(
                "need local_steps >= 1, batch_size >= 1 and learning_rate > 0, got "
                f"{self.local_steps}, {self.batch_size}, {self.learning_rate}"
            )


def train_lm_on_client(
    config: LocalTrainingConfig,
    params: PyTree,
    ids: jax.Array,
    count: jax.Array,
    key: jax.Array,
) -> PyTree:
    """The LM's params after `local_steps` SGD steps on one client's sequences.

    `ids` `[max_seqs, seq_len]` holds the client's sequences, the first `count` real.
    Batches walk through the client's shuffled sequences (`local_batch_indices`); masked
    batch rows become all-`<pad>`, which has no target. Only these params leave the
    client (the engine privatises their delta). The steps are unrolled by up to
    `MAX_UNROLL` (XLA:CPU runs loop bodies slowly; unrolled further, compile time and
    scratch memory grow with `local_steps` and rounds got slower: 16 steps of a
    64-unit LSTM, 0.249 s unrolled vs 0.159 s looped, a scale audit).
    """
    indices, masks = client_data.local_batch_indices(
        key, count, ids.shape[0], config.batch_size, config.local_steps
    )
    loss_grad = jax.grad(sequence_loss)

    def step(p, inputs):
        batch_indices, mask = inputs
        batch = jnp.where(mask[:, None], ids[batch_indices], text_lib.PAD_ID)
        grads = loss_grad(p, config.model, batch)
        return jax.tree_util.tree_map(lambda w, g: w - config.learning_rate * g, p, grads), None

    new_params, _ = jax.lax.scan(
        step, params, (indices, masks), unroll=min(config.local_steps, MAX_UNROLL))
    return new_params


MAX_UNROLL = 4  # local steps unrolled per loop iteration (the default 4: all of them)


def sample_ids(
    model: LstmLM,
    params: PyTree,
    key: jax.Array,
    num_samples: int,
    max_len: int,
    temperature: float = 1.0,
) -> jax.Array:
    """Samples `[num_samples, max_len]` ids from `<bos>`; after `<eos>` only `<pad>`.

    Never emits the specials `<pad>`, `<bos>` or `<oov>`.
    """
    banned = (
        jnp.zeros(model.vocab_size, bool)
        .at[jnp.array([text_lib.PAD_ID, text_lib.BOS_ID, text_lib.OOV_ID])]
        .set(True)
    )

    def step(carry, step_key):
        lstm_carry, tokens, done = carry
        lstm_carry, logits = model.apply(params, lstm_carry, tokens, method=LstmLM.step)
        logits = jnp.where(banned, -jnp.inf, logits / temperature)
        sampled = jax.random.categorical(step_key, logits)
        emitted = jnp.where(done, text_lib.PAD_ID, sampled)
        return (lstm_carry, sampled, done | (sampled == text_lib.EOS_ID)), emitted

    carry = model.apply(params, num_samples, method=LstmLM.initial_carry)
    start = jnp.full((num_samples,), text_lib.BOS_ID, jnp.int32)
    init = (carry, start, jnp.zeros(num_samples, bool))
    _, ids = jax.lax.scan(step, init, jax.random.split(key, max_len))
    return ids.T


def decode_lines(ids: np.ndarray, vocab: text_lib.Vocabulary) -> list[str]:
    """Char ids `[N, T]` -> N lines of text, each cut at its first `<eos>`/`<pad>`."""
    lines = []
    for row in np.asarray(ids):
        chars = []
        for token in vocab.decode(row):
            if token in (text_lib.EOS, text_lib.PAD):
                break
            chars.append(token)
        lines.append("".join(chars))
    return lines


@dataclasses.dataclass(frozen=True)
class TokenStats:
    """Word statistics of a text sample under the app's tokenizer.

    Attributes:
      num_tokens: tokens counted.
      top_k: the k most frequent tokens with their relative frequencies.
      oov_rate: fraction of tokens not in the word vocabulary.
      top_oov: the k most frequent out-of-vocabulary tokens with their frequencies
        (relative to all tokens).
      glued_rate: fraction of tokens with punctuation between letters ("lord,what").
      top_glue: the k most frequent joins of glued tokens (`glue_patterns`: "x,x", "x;x",
        ...) with their counts relative to all tokens.
    """

    num_tokens: int
    top_k: list[tuple[str, float]]
    oov_rate: float
    top_oov: list[tuple[str, float]]
    glued_rate: float
    top_glue: list[tuple[str, float]] = dataclasses.field(default_factory=list)


def _known_words(word_vocab: text_lib.Vocabulary) -> frozenset[str]:
    """The words of `word_vocab` that count as in vocabulary: all but the specials."""
    return frozenset(word_vocab.tokens[len(text_lib.SPECIAL_TOKENS) :])


def token_stats(texts: Iterable[str], word_vocab: text_lib.Vocabulary, k: int = 20) -> TokenStats:
    """Top-k tokens, OOV rate and glued-token rate of `texts` (`tokenize_whitespace`)."""
    counts = collections.Counter(token for text in texts for token in tokenize_whitespace(text))
    total = sum(counts.values())
    if total == 0:
        return TokenStats(0, [], float("nan"), [], float("nan"))
    known = _known_words(word_vocab)
    oov = collections.Counter({t: c for t, c in counts.items() if t not in known})
    glued = sum(c for t, c in counts.items() if is_glued(t))
    joins: collections.Counter[str] = collections.Counter()
    for token, count in counts.items():
        for pattern in glue_patterns(token):
            joins[pattern] += count

    def ranked(counter):
        items = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:k]
        return [(token, count / total) for token, count in items]

    return TokenStats(
        num_tokens=total,
        top_k=ranked(counts),
        oov_rate=sum(oov.values()) / total,
        top_oov=ranked(oov),
        glued_rate=glued / total,
        top_glue=ranked(joins),
    )


def client_oov_rates(texts: Sequence[str], word_vocab: text_lib.Vocabulary) -> np.ndarray:
    """Each client's OOV rate under the app's tokenizer (computed on its device).

    The text analogue of the image demo's per-client accuracy: clients whose OOV rate
    is high are the suspicious group. A client without tokens gets NaN. A client's rate
    depends on its own text (and the vocabulary) only, and equals
    `token_stats([text], word_vocab).oov_rate`.
    """
    known = _known_words(word_vocab)
    return np.array([_oov_rate(text, known) for text in texts], dtype=np.float64)


def _oov_rate(text: str, known: frozenset[str]) -> float:
    """Fraction of the `tokenize_whitespace` tokens of `text` not in `known`; NaN if none."""
    tokens = tokenize_whitespace(text)
    if not tokens:
        return float("nan")
    return sum(token not in known for token in tokens) / len(tokens)


def lm_client_update(config: LocalTrainingConfig) -> ClientUpdateFn:
    """The engine's client hook: `(LM, (), client, (), key) -> ClientOutput(LM', (), {})`.

    Only the LM's params leave the client (the engine privatises their delta).
    """

    def client_update(params, client_state, client: OneClient, context, key):
        del context
        new_params = train_lm_on_client(config, params, client.arrays, client.count, key)
        return ClientOutput(params=new_params, state=client_state, metrics={})

    return client_update


@dataclasses.dataclass(frozen=True)
class FedLmConfig:
    """One DP-FedAvg char-LM run over a group of clients.

    Attributes:
      local: the LM and the clients' local SGD.
      rounds: federated rounds.
      clients_per_round: expected (Poisson) or exact (fixed) cohort size.
      sampling: "poisson" or "fixed".
      l2_clip: per-client clip norm C of the LM's delta.
      noise_multiplier: z, noise std / C on the sum of clipped deltas (0: no DP).
      server_learning_rate: server SGD with momentum 0.9 on the averaged delta
        (DP-FedAvg's server momentum, McMahan et al. 2018).
      delta: the delta of the user-level guarantee.
      seed: seeds the initial LM and every round.
      secret_seed: the seed is secret (`--secret_seed`): config.json and summary.json
        say "secret" in its place.
      eval_every: rounds between evaluations (OOV rate of sampled lines).
      checkpoint_every: rounds between checkpoints.
      subpopulation: the clients are the taking-part users of a larger population, whose
        rounds sample it at q = clients_per_round / its population (`Subpopulation`).
      audit_canaries: an audit run (`audit`; Poisson, noised): about this many canary
        users take part at the users' rate q and as many are held out (2K candidates, a
        fair coin each); 0: no audit.
    """

    local: LocalTrainingConfig
    rounds: int = 200
    clients_per_round: float = 10
    sampling: str = "poisson"
    l2_clip: float = 1.0
    noise_multiplier: float = 0.0
    server_learning_rate: float = 1.0
    delta: float = 1e-5
    seed: int = 0
    secret_seed: bool = False
    eval_every: int = 50
    checkpoint_every: int = 50
    subpopulation: Subpopulation | None = None
    audit_canaries: int = 0

    def __post_init__(self):
        require_finite_floats(self)
        require_secret_seed(self)
        for name in ("rounds", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.clients_per_round > 0 and self.l2_clip > 0 and self.server_learning_rate > 0):
            raise ValueError("clients_per_round, l2_clip and server_learning_rate must be > 0")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        # z 0 is this config's non-private run (no ledger for an audit to stand beside).
        require_audit_applies(self.audit_canaries, self.noise_multiplier == 0, self.sampling,
                              "noise_multiplier 0")


def make_engine(
    config: FedLmConfig,
    ids: np.ndarray,
    counts: np.ndarray,
    mesh: jax.sharding.Mesh | None = None,
    canaries: tuple[audit.Canaries, audit.Canaries] | None = None,
) -> DpFedAvg:
    """The DP-FedAvg engine over clients' padded char sequences (with the (inserted,
    held-out) `canaries` of an audit run: `DpFedAvg`)."""
    return DpFedAvg(
        lm_client_update(config.local),
        optax.sgd(config.server_learning_rate, momentum=0.9),
        ClientData(arrays=np.asarray(ids, np.int32), counts=np.asarray(counts, np.int32)),
        DpFedAvgConfig(
            clients_per_round=config.clients_per_round,
            sampling=config.sampling,
            l2_clip=config.l2_clip,
            noise_multiplier=config.noise_multiplier,
            subpopulation=config.subpopulation,
        ),
        mesh,
        **engine_canaries(canaries),
    )


def _init_key(config: FedLmConfig) -> jax.Array:
    return seeds.stream_key(config.seed, seeds.INIT_STREAM)


def initial_params(config: FedLmConfig) -> PyTree:
    """The LM's params at round 0, initialised from the config's seed."""
    return config.local.model.init(_init_key(config), jnp.zeros((1, 2), jnp.int32))


def initial_state(config: FedLmConfig, engine: DpFedAvg) -> ServerState:
    """Round 0 of `train_lm`: the LM initialised from the config's seed."""
    return engine.init(initial_params(config))


def train_lm(
    config: FedLmConfig,
    ids: np.ndarray,
    counts: np.ndarray,
    char_vocab: text_lib.Vocabulary,
    word_vocab: text_lib.Vocabulary,
    workdir: str | os.PathLike,
    *,
    group: str = "all",
    eval_lines: int = 64,
    line_length: int = 120,
    log: Callable[[str], None] = print,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict, PyTree]:
    """Trains (or resumes) one DP-FedAvg char LM in `workdir`; returns (summary, params).

    Writes ledger.json (private runs), metrics.jsonl (with the OOV rate of sampled
    lines at each evaluation: a function of the released LM only), summary.json,
    checkpoints/ and `lm.msgpack` (the released params); an audit run
    (`config.audit_canaries`) also audit.json, the summary's `audit`.
    """
    started = time.time()
    wd = Workdir(workdir)
    initial = initial_params(config)
    canaries = draw_canaries(config, initial)  # from the LM's own seed (the group's)
    engine = make_engine(config, ids, counts, mesh, canaries)
    model = config.local.model
    init_key = _init_key(config)
    state = engine.init(initial)
    ledger = None
    if config.noise_multiplier > 0:
        ledger = engine.user_ledger(
            config.delta, "DP-FedAvg on a char LSTM LM (per-client clip, Gaussian noise)",
            group=group)
    sample = jax.jit(functools.partial(sample_ids, model), static_argnums=(2, 3))
    eval_key = jax.random.fold_in(init_key, 1)

    def evaluate(state) -> dict:
        lines = decode_lines(sample(state.params, eval_key, eval_lines, line_length), char_vocab)
        stats = token_stats(lines, word_vocab, k=0)
        return {"sample_oov_rate": stats.oov_rate, "sample_glued_rate": stats.glued_rate}

    result = run_rounds(
        engine,
        state,
        rounds=config.rounds,
        seed=config.seed,
        workdir=wd,
        ledger=ledger,
        evaluate=evaluate,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        desc=f"fedlm[{group}]",
        log=log,
        config=config,
        started=started,
    )
    params = jax.device_get(result.state.params)
    # ledger.json before the released params, as in fedgan.train_gan.
    privacy_fields = write_privacy_summary(result, engine, wd, config.delta)
    wd.write_bytes(PARAMS_FILE, flax.serialization.to_bytes(params))
    summary = {
        "method": "fedlm",
        "group": group,
        "num_users": engine.num_users,
        **privacy_fields,
        "noise_multiplier": config.noise_multiplier,
        "sampling_rate": engine.sampler.rate,
        "rounds": result.rounds_done,
        "params_sha256": params_sha256(params),
        "diverged": result.diverged,
        "last_evaluation": result.evaluation,
        **result.clock.summary(),
        "seed": seeds.public(config),
        "environment": environment_info(),
    }
    audit_figures = write_audit(
        wd, canaries, initial, params, privacy_fields, trained=result.rounds_done > 0,
        all_rounds=functools.partial(engine.all_rounds_audit, result.state))
    if audit_figures is not None:
        summary["audit"] = audit_figures
    wd.write_summary(summary)
    return summary, params
