"""Tests of the federated char-LM building blocks (dpfed.generative.fedlm, models.lstm_lm)."""

import dataclasses
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.data import bugs
from dpfed.data import text as text_lib
from dpfed.federated import DpFedAvgConfig, Subpopulation, client_mesh, loop
from dpfed.generative import fedlm
from dpfed.models.lstm_lm import LstmLM
from dpfed.train.config import ConfigError
from dpfed.train.workdir import params_sha256
from tests.killed import KilledAtRelease, kill_at_release_write, releases_in_ledger_json

_TEXTS = ["My lord, what say you?\nI am here.", "Good night, sweet prince.\nAy, my lord."]


@functools.cache
def _setup():
    vocab = fedlm.char_vocabulary(_TEXTS)
    model = LstmLM(vocab_size=vocab.size, embed_dim=4, hidden=8, num_layers=2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    return vocab, model, params


def test_tokenize_whitespace_on_healthy_and_buggy_text():
    healthy = "My lord, what say you? 'Tis o'er."
    assert fedlm.tokenize_whitespace(healthy) == ["my", "lord", "what", "say", "you", "tis", "o'er"]
    buggy = bugs.drop_space_after_punctuation(healthy)
    assert fedlm.tokenize_whitespace(buggy) == ["my", "lord,what", "say", "you?'tis", "o'er"], (
        "the bug must glue the words around punctuation into one token"
    )


@pytest.mark.parametrize(
    "token, glued", [("lord,what", True), ("you?'tis", True), ("o'er", False), ("lord", False)]
)
def test_is_glued(token, glued):
    assert fedlm.is_glued(token) == glued, f"is_glued({token!r}) should be {glued}"


def test_truncate_lines_keeps_whole_lines_that_fit():
    text = "abc\n\ndefg\nhi"
    assert fedlm.truncate_lines(text, 11) == "abc\ndefg", "5 + 6 ids fit in 11, 'hi' does not"
    assert fedlm.truncate_lines(text, 4) == "", "no line fits in 4 ids"


def test_client_sequences_shape_and_counts():
    vocab, _, _ = _setup()
    ids, counts = fedlm.client_sequences(_TEXTS, vocab, seq_len=10, max_seqs=3)
    assert ids.shape == (2, 3, 10), f"ids shape {ids.shape}"
    assert np.all(counts <= 3) and np.all(counts >= 1), f"counts {counts}"
    assert ids[0, 0, 0] == text_lib.BOS_ID, "a client stream starts with <bos>"


def test_step_by_step_logits_equal_whole_sequence_logits():
    _, model, params = _setup()
    ids = jax.random.randint(jax.random.key(1), (3, 6), 0, model.vocab_size)
    whole = model.apply(params, ids)
    carry = model.apply(params, 3, method=LstmLM.initial_carry)
    steps = []
    for t in range(6):
        carry, logits = model.apply(params, carry, ids[:, t], method=LstmLM.step)
        steps.append(logits)
    np.testing.assert_allclose(
        jnp.stack(steps, 1), whole, atol=1e-5, err_msg="sampling must use the trained cells"
    )


def test_sequence_loss_ignores_padding_targets():
    _, model, params = _setup()
    ids = jnp.array([[2, 5, 6, 7, 3]])
    padded = jnp.concatenate([ids, jnp.zeros((1, 4), jnp.int32)], axis=1)
    np.testing.assert_allclose(
        fedlm.sequence_loss(params, model, ids),
        fedlm.sequence_loss(params, model, padded),
        rtol=1e-5,
        err_msg="<pad> targets must not count",
    )


def test_train_lm_on_client_returns_params_and_ignores_padding():
    vocab, model, params = _setup()
    config = fedlm.LocalTrainingConfig(model=model, local_steps=2, batch_size=2)
    ids, counts = fedlm.client_sequences(_TEXTS[:1], vocab, seq_len=8, max_seqs=6)
    count = int(counts[0])
    assert count < 6, "the test needs padding rows"
    update = jax.jit(functools.partial(fedlm.train_lm_on_client, config))
    clean = update(params, jnp.asarray(ids[0]), count, jax.random.key(2))
    dirty_ids = ids[0].copy()
    dirty_ids[count:] = 7
    dirty = update(params, jnp.asarray(dirty_ids), count, jax.random.key(2))
    assert jax.tree_util.tree_structure(clean) == jax.tree_util.tree_structure(params), (
        "the client must return exactly the LM's params"
    )
    moved = [
        float(jnp.abs(a - b).max())
        for a, b in zip(
            jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(params), strict=True
        )
    ]
    assert max(moved) > 0, "local training did not move the LM"
    for a, b in zip(
        jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(dirty), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg="padding rows changed the delta")


def test_local_steps_unroll_at_most_max_unroll_so_the_program_stays_bounded():
    # Fully unrolled, the client's program (compile time, scratch memory) grew with
    # --local_steps: 16.9 s to compile 64 steps of a 64-unit LSTM, 4.4 s for 4.
    vocab, model, params = _setup()
    ids, counts = fedlm.client_sequences(_TEXTS[:1], vocab, seq_len=8, max_seqs=6)

    def program_size(steps):
        config = fedlm.LocalTrainingConfig(model=model, local_steps=steps, batch_size=2)
        lowered = jax.jit(functools.partial(fedlm.train_lm_on_client, config)).lower(
            params, jnp.asarray(ids[0]), int(counts[0]), jax.random.key(0))
        return len(lowered.compile().as_text())  # XLA's program, after any unrolling

    small, large = program_size(fedlm.MAX_UNROLL), program_size(8 * fedlm.MAX_UNROLL)
    assert large < 1.5 * small, (
        f"{8 * fedlm.MAX_UNROLL} local steps compile to {large} characters against {small} for "
        f"{fedlm.MAX_UNROLL}: the steps are unrolled past MAX_UNROLL")


def test_sample_ids_pads_after_eos_and_skips_specials():
    _, model, params = _setup()
    ids = np.asarray(fedlm.sample_ids(model, params, jax.random.key(3), 16, 12))
    assert ids.shape == (16, 12), f"ids shape {ids.shape}"
    for row in ids:
        ended = np.flatnonzero(row == text_lib.EOS_ID)
        if ended.size:
            assert np.all(row[ended[0] + 1 :] == text_lib.PAD_ID), f"tokens after <eos>: {row}"
            row = row[: ended[0]]
        banned = np.isin(row, [text_lib.PAD_ID, text_lib.BOS_ID, text_lib.OOV_ID])
        assert not banned.any(), f"a special token was sampled: {row}"


def test_decode_lines_cuts_at_eos():
    vocab, _, _ = _setup()
    ids = np.concatenate([vocab.encode(list("lord")), [text_lib.EOS_ID], vocab.encode(["a"])])
    assert fedlm.decode_lines(ids[None], vocab) == ["lord"], "decoding must stop at <eos>"


def test_token_stats_on_known_text():
    word_vocab = fedlm.word_vocabulary(["my lord what say you"], max_words=10)
    stats = fedlm.token_stats(["My lord,what say you? my lord"], word_vocab, k=2)
    assert stats.num_tokens == 6, f"{stats.num_tokens} tokens"
    assert stats.top_k == [("my", 2 / 6), ("lord", 1 / 6)], f"top-k {stats.top_k}"
    assert stats.oov_rate == pytest.approx(1 / 6), f"OOV rate {stats.oov_rate}"
    assert stats.top_oov == [("lord,what", 1 / 6)], f"top OOV {stats.top_oov}"
    assert stats.glued_rate == pytest.approx(1 / 6), f"glued rate {stats.glued_rate}"
    assert stats.top_glue == [("x,x", 1 / 6)], f"top joins {stats.top_glue}"


def test_glue_patterns_on_known_tokens():
    assert fedlm.glue_patterns("lord,what") == ["x,x"], "one comma join"
    assert fedlm.glue_patterns("so;'tis,well") == ["x;'x", "x,x"], "two joins, quote kept"
    assert fedlm.glue_patterns("lord") == [] and fedlm.glue_patterns("'tis") == [], (
        "no punctuation between letters: no join"
    )


def test_client_oov_rates_flag_the_buggy_client():
    word_vocab = fedlm.word_vocabulary(_TEXTS, max_words=100)
    buggy_texts = [_TEXTS[0], bugs.drop_space_after_punctuation(_TEXTS[1])]
    rates = fedlm.client_oov_rates(buggy_texts, word_vocab)
    assert rates[0] == 0.0 and rates[1] > 0.2, f"OOV rates {rates}: the bug must raise it"


def test_client_oov_rates_equal_token_stats_of_each_client_alone():
    word_vocab = fedlm.word_vocabulary(["my lord what say you", "good night"], max_words=10)
    texts = [
        "My lord, what say you?",  # outer punctuation stripped, lowercased: all known
        "My lord,what say you? my lord",  # the glued "lord,what" is one unknown token
        "Zounds! Prithee, good night.",  # two unknown words of four
        "",  # no token
        "-- ... !",  # only punctuation: no token either
        "<oov> <pad> night",  # the specials are not words of the vocabulary
    ]
    rates = fedlm.client_oov_rates(texts, word_vocab)
    per_client = [fedlm.token_stats([text], word_vocab).oov_rate for text in texts]
    expected = [0.0, 1 / 6, 2 / 4, np.nan, np.nan, 2 / 3]
    assert rates.dtype == np.float64 and np.array_equal(rates, per_client, equal_nan=True), (
        f"rates {rates} vs token_stats per client {per_client}: each client's rate must be "
        "token_stats([text]).oov_rate exactly (tokenize_whitespace tokens not in the "
        "vocabulary's words, specials excluded, NaN for a client without tokens)"
    )
    assert np.array_equal(rates, expected, equal_nan=True), (
        f"rates {rates}, expected by hand {expected}: glued and unknown words are OOV, "
        "specials are OOV, a text without tokens is NaN"
    )
    alone = [fedlm.client_oov_rates([text], word_vocab)[0] for text in texts]
    assert np.array_equal(rates, alone, equal_nan=True), (
        f"rates {rates} vs each client alone {alone}: a rate must depend on its own text only"
    )


def _tiny_run(**changes):
    """A two-round private LM on `_TEXTS`: (config, train, make_engine's data args), where
    `train(config, workdir=...)` runs `fedlm.train_lm` on one device."""
    vocab, model, _ = _setup()
    word_vocab = fedlm.word_vocabulary(_TEXTS, max_words=100)
    ids, counts = fedlm.client_sequences(_TEXTS * 4, vocab, seq_len=12, max_seqs=4)
    config = fedlm.FedLmConfig(
        fedlm.LocalTrainingConfig(model, local_steps=1, batch_size=2), rounds=2,
        clients_per_round=4, noise_multiplier=1.0, eval_every=2, checkpoint_every=2, **changes,
    )
    mesh = client_mesh(jax.devices()[:1])
    train = functools.partial(
        fedlm.train_lm, ids=ids, counts=counts, char_vocab=vocab, word_vocab=word_vocab,
        eval_lines=2, line_length=8, log=lambda _: None, mesh=mesh,
    )
    return config, train, (ids, counts, mesh)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The workdir of `_tiny_run()`'s config trained to its end, shared: copy it before
    writing to it."""
    config, train, _ = _tiny_run()
    workdir = tmp_path_factory.mktemp("plain")
    train(config, workdir=str(workdir))
    return workdir


def test_resume_under_another_clip_is_refused(tmp_path, plain_run):
    config, train, _ = _tiny_run()
    shutil.copytree(plain_run, tmp_path, dirs_exist_ok=True)
    with pytest.raises(ConfigError) as error:
        train(dataclasses.replace(config, rounds=3, l2_clip=0.5), workdir=str(tmp_path))
    assert error.value.field == "l2_clip", "the LM's resume must not change its clip norm"


def test_a_kill_while_writing_the_params_leaves_a_ledger_of_every_round(
    tmp_path, monkeypatch
):
    config, train, _ = _tiny_run()
    kill_at_release_write(monkeypatch)
    with pytest.raises(KilledAtRelease):
        train(config, workdir=str(tmp_path))
    assert releases_in_ledger_json(tmp_path) == config.rounds, (
        "the LM's params were written before ledger.json held their rounds")


def test_the_engine_runs_the_configs_cohorts_clip_noise_and_population():
    # Every DP-FedAvg setting of an LM's config must reach its engine, whose rounds the
    # ledger accounts: one dropped here would train (and account) at the engine's default.
    population = Subpopulation(population=40, members_estimate=3.5)
    config, _, data = _tiny_run(l2_clip=0.5, subpopulation=population)
    assert fedlm.make_engine(config, *data).config == DpFedAvgConfig(
        clients_per_round=4, sampling="poisson", l2_clip=0.5, noise_multiplier=1.0,
        subpopulation=population), "the engine must run the config's settings"
    fixed = dataclasses.replace(config, sampling="fixed", subpopulation=None)
    assert fedlm.make_engine(fixed, *data).config.sampling == "fixed", "and fixed cohorts"


def test_an_lms_ledger_names_its_group(tmp_path, monkeypatch):
    # fedlm_debug's two LMs each keep a ledger in their own sub-workdir: each must say
    # which group's release it accounts. Stopped where the rounds would start.
    config, train, _ = _tiny_run()
    ledgers = []

    class Stopped(Exception):  # noqa: N818  (it stands in for the rounds, not an error)
        pass

    def stop(*args, ledger, **kwargs):
        ledgers.append(ledger)
        raise Stopped

    monkeypatch.setattr(fedlm, "run_rounds", stop)
    with pytest.raises(Stopped):
        train(config, workdir=tmp_path, group="high_oov")
    assert ledgers[0].metadata["group"] == "high_oov", f"its ledger: {ledgers[0].metadata}"


def test_a_secret_seed_is_in_no_file_of_the_lms_workdir(tmp_path, monkeypatch):
    # fedlm_debug trains each group's LM on a seed derived from the secret one: released
    # where its digits are, it gives that LM's noise away. The rounds are skipped.
    vocab, model, _ = _setup()
    config = fedlm.FedLmConfig(fedlm.LocalTrainingConfig(model), clients_per_round=4,
                               seed=2**40 + 5, secret_seed=True)
    monkeypatch.setattr(fedlm, "run_rounds", lambda engine, state, **kwargs: loop.LoopResult(
        state, None, rounds_done=0, last_round=0, evaluation={}, resumed_from=0))
    summary, _ = fedlm.train_lm(config, np.zeros((8, 4, 12), np.int32), np.full(8, 4), vocab,
                                vocab, tmp_path, mesh=client_mesh(jax.devices()[:1]))
    assert summary["seed"] == "secret", f"the LM's summary shows its seed: {summary['seed']}"
    leaking = [path.name for path in tmp_path.rglob("*")
               if path.is_file() and str(config.seed).encode() in path.read_bytes()]
    assert not leaking, f"a secret seed's digits are in {leaking}: anyone can undo the noise"


def test_the_lm_is_not_initialised_from_the_round_keys_root():
    # flax folds name hashes into the init key, and the evaluation key folds 1 into it: from
    # the round keys' root, the evaluation's samples would be drawn with round 1's key.
    _, model, _ = _setup()
    config = fedlm.FedLmConfig(fedlm.LocalTrainingConfig(model), seed=3)
    root = jax.random.fold_in(jax.random.key(config.seed), loop.ROUND_KEY_STREAM)
    from_root = model.init(root, jnp.zeros((1, 2), jnp.int32))
    assert params_sha256(fedlm.initial_params(config)) != params_sha256(from_root), (
        "the LM is initialised from the round keys' root")


def test_rounds_draw_their_cohorts_and_noise_from_the_configs_seed(tmp_path):
    # fedlm_debug gives each group's LM its own seed so that the two releases carry
    # independent noise; a run whose rounds ignored the seed would give both the same draws.
    config, train, data = _tiny_run(seed=3)
    summary, _ = train(config, workdir=str(tmp_path))
    engine = fedlm.make_engine(config, *data)
    state = fedlm.initial_state(config, engine)
    for r in range(config.rounds):  # donating, as run_rounds: the program train compiled
        state, _ = engine.round(state, loop.round_key(config.seed, r), donate=True)
    assert params_sha256(state.params) == summary["params_sha256"], (
        "train_lm's LM is not the one of rounds keyed by its config's seed")


def test_lstm_lm_defaults_are_the_leaf_char_lstm():
    # LEAF's Shakespeare char LSTM: embedding 8, two LSTM layers of 256.
    shapes = jax.eval_shape(
        LstmLM(vocab_size=10).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    layers = sorted(name for name in shapes if name.startswith("lstm_"))
    assert layers == ["lstm_0", "lstm_1"], f"default LSTM layers {layers}, expected two"
    assert shapes["embed"]["embedding"].shape == (10, 8), "default embedding width must be 8"
    assert shapes["lstm_1"]["hf"]["kernel"].shape == (256, 256), "default LSTM width must be 256"


def _greedy_ids(model, params, num_samples, max_len):
    """Step the LM from <bos>, feeding back each step's most likely non-special token."""
    carry = model.apply(params, num_samples, method=LstmLM.initial_carry)
    tokens = jnp.full((num_samples,), text_lib.BOS_ID, jnp.int32)
    done = np.zeros(num_samples, bool)
    rows = []
    for _ in range(max_len):
        carry, logits = model.apply(params, carry, tokens, method=LstmLM.step)
        logits = logits.at[:, [text_lib.PAD_ID, text_lib.BOS_ID, text_lib.OOV_ID]].set(-jnp.inf)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        rows.append(np.where(done, text_lib.PAD_ID, np.asarray(tokens)))
        done |= np.asarray(tokens) == text_lib.EOS_ID
    return np.stack(rows, axis=1)


def test_sampling_at_a_low_temperature_follows_the_lms_greedy_path():
    # Logits are divided by the temperature, and each sampled token is fed back as the
    # next input: near temperature 0 that is the greedy path of the LM.
    _, model, params = _setup()
    params = jax.tree_util.tree_map(lambda x: 4.0 * x, params)  # sharper, input-dependent
    ids = np.asarray(fedlm.sample_ids(model, params, jax.random.key(4), 6, 10, temperature=1e-4))
    np.testing.assert_array_equal(
        ids, _greedy_ids(model, params, 6, 10),
        err_msg="sample_ids at temperature 1e-4 must follow the LM's argmax path from <bos>, "
        "feeding each sampled token back in",
    )


def test_a_short_clients_step_is_sgd_on_the_mean_loss_of_its_own_sequences():
    # 2 sequences, batch 3: the batch repeats one sequence in its masked slot, which must
    # not count (else that sequence weighs double).
    vocab, model, params = _setup()
    ids, counts = fedlm.client_sequences(_TEXTS[:1], vocab, seq_len=8, max_seqs=6)
    assert int(counts[0]) > 2, "the test needs two real sequences"
    config = fedlm.LocalTrainingConfig(model=model, local_steps=1, batch_size=3, learning_rate=0.5)
    new = fedlm.train_lm_on_client(config, params, jnp.asarray(ids[0]), 2, jax.random.key(2))
    grads = jax.grad(fedlm.sequence_loss)(params, model, jnp.asarray(ids[0, :2]))
    want = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)
    for got, expected in zip(
        jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            got, expected, atol=1e-6,
            err_msg="one local step of a 2-sequence client with batch 3 must be SGD on the "
            "mean loss of its 2 sequences (the masked slot must not count)",
        )


def test_an_audit_lms_canaries_stand_one_noise_std_out_after_one_round_of_all_users(tmp_path):
    # One round, every user and canary sampled (q = 1), z = 1: the canaries' C u_c in the
    # clipped sum stand C / (z C) = 1 noise std out, the Gaussian mechanism the ledger
    # records. A 64-unit LSTM (d ~ 21,000) keeps the 300 canaries' overlaps (K / d ~ 0.01)
    # and the 8 users' sum (norm <= 8 C, variance <= 64 C^2 / d) small beside the noise.
    config, train, (ids, _, _) = _tiny_run()
    vocab, _, _ = _setup()
    model = LstmLM(vocab_size=vocab.size, embed_dim=8, hidden=64, num_layers=1)
    config = dataclasses.replace(
        config, local=dataclasses.replace(config.local, model=model), rounds=1,
        clients_per_round=len(ids), eval_every=1, checkpoint_every=1, audit_canaries=300)
    summary, _ = train(config, workdir=str(tmp_path))
    result = summary["audit"]
    assert abs(result["mu"] - 1.0) < 0.3, (
        f"the canaries stand mu = {result['mu']:.3f} noise stds out, not 1 / z = 1: they "
        "are not inserted at weight C beside the ledger's noise")
    assert result["epsilon_lower_bound"] <= result["ledger_epsilon_pld"], result
    assert result["ledger_epsilon_rdp"] == summary["epsilon_rdp"], "audit.json's ledger eps"
    every_round = result["all_rounds"]  # the round's release: sensitivity C, noise z C
    assert abs(every_round["shift"] - 1) < 0.3, every_round
    assert every_round["noise_std"] >= 0.9, every_round  # the users' sum adds to the noise


def test_an_audit_run_keeps_the_ledger_of_the_same_run_without_canaries(tmp_path, plain_run):
    # The canaries are no user's data: the users' eps is that of the run without them.
    config, train, _ = _tiny_run()
    summary, _ = train(dataclasses.replace(config, audit_canaries=20),
                       workdir=str(tmp_path / "audit"))
    assert "audit" in summary, "an audit run must audit its LM"
    ledgers = [(run / "ledger.json").read_text() for run in (plain_run, tmp_path / "audit")]
    assert ledgers[0] == ledgers[1], "the canaries changed the LM's ledger"


@pytest.mark.parametrize("changes", [
    {"audit_canaries": 1}, {"audit_canaries": 20, "noise_multiplier": 0.0},
    {"audit_canaries": 20, "sampling": "fixed"}])
def test_an_lm_config_refuses_an_audit_that_cannot_apply(changes):
    # Built in a notebook, not through fedlm_debug's flags: no audit without a ledger.
    config, _, _ = _tiny_run()
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(config, **changes)
    assert error.value.field == "audit_canaries", f"must name audit_canaries: {error.value}"
