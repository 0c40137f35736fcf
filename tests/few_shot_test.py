"""Few-shot prompts (template, seeded shots), generation scoring, multiple choice by
log-likelihood checked against LoadedModel.score, and the batched likelihood itself."""
import dataclasses

import numpy as np
import pytest

from t5x_lite.data import testing as data_testing
from t5x_lite.evaluation import few_shot, likelihood, predictions
from t5x_lite.evaluation import testing as eval_testing
from t5x_lite.evaluation.predictions import Example

POOL = [Example(i, f"the value {w}", w) for i, w in
        enumerate(["one", "two", "three", "four", "five", "six"])]
QUERIES = [Example(i, f"the file {w}", w) for i, w in enumerate(["two", "five", "one"])]


@pytest.fixture(scope="module")
def vocab():
    return data_testing.tiny_vocab(400)


def _loaded(family, vocab):
    cfg = (eval_testing.tiny_gpt(max_len=128) if family == "gpt" else eval_testing.tiny_t5())
    cfg = dataclasses.replace(cfg, vocab_size=vocab.padded_vocab_size)
    # Larger weights than the init: peaked distributions make the argmax tests meaningful.
    return eval_testing.random_loaded(cfg, vocab, scale=4.0)


@pytest.fixture(scope="module")
def gpt(vocab):
    return _loaded("gpt", vocab)


@pytest.fixture(scope="module")
def t5(vocab):
    return _loaded("t5", vocab)


def test_prompt_layout_zero_one_few_shot():
    t = few_shot.FewShotTemplate("Q: {inputs} A: {targets}", separator=" | ", prefix="Answer.")
    assert t.build([], "x") == "Answer. | Q: x A:"
    assert t.build(POOL[:1], "x") == "Answer. | Q: the value one A: one | Q: x A:"
    assert t.build(POOL[2:4], "x") == ("Answer. | Q: the value three A: three | "
                                       "Q: the value four A: four | Q: x A:")
    assert few_shot.FewShotTemplate("{inputs} = {targets}.").query("2+2") == "2+2 ="
    assert t.stop_strings() == ["|", "Q:"]


def test_shots_are_seeded_per_query_distinct_and_never_the_query_itself():
    prompts, shots = few_shot.build_prompts(QUERIES, POOL, k=3, template=few_shot.FewShotTemplate(),
                                            seed=7)
    again = few_shot.build_prompts(QUERIES, POOL, k=3, template=few_shot.FewShotTemplate(), seed=7)
    assert (prompts, shots) == again
    assert shots[:2] == few_shot.build_prompts(QUERIES[:2], POOL, k=3,
                                               template=few_shot.FewShotTemplate(), seed=7)[1]
    assert all(len(set(s)) == 3 for s in shots) and len({tuple(s) for s in shots}) > 1
    assert shots != few_shot.build_prompts(QUERIES, POOL, k=3,
                                           template=few_shot.FewShotTemplate(), seed=8)[1]
    for i, (p, s) in enumerate(zip(prompts, shots)):
        assert s == few_shot.draw_shots(len(POOL), 3, 7, i)
        assert p == "\n".join([f"Q: {POOL[j].inputs} A: {POOL[j].targets}" for j in s]
                              + [f"Q: {QUERIES[i].inputs} A:"])
    # Pool == queries: a query never sees itself as a shot.
    for i in range(len(POOL)):
        assert i not in few_shot.draw_shots(len(POOL), 5, 0, i, exclude=i)
    with pytest.raises(few_shot.FewShotError, match="only 5 examples"):
        few_shot.draw_shots(len(POOL), 6, 0, 0, exclude=0)


def test_draw_shots_equals_a_choice_over_the_allowed_indices():
    """The draw without building the allowed-index array is numpy's choice over that array."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 40))
        exclude = set(rng.integers(0, n + 3, size=int(rng.integers(0, 6))).tolist())
        allowed = np.array([i for i in range(n) if i not in exclude])
        k = int(rng.integers(0, allowed.size + 1))
        want = (np.random.default_rng([trial, 5]).choice(allowed, size=k, replace=False).tolist()
                if k else [])
        assert few_shot.draw_shots(n, k, trial, 5, exclude=exclude) == want


def test_a_duplicate_of_the_query_in_the_pool_is_never_a_shot():
    """A pool example with the query's inputs (here spelled with other whitespace) would put
    the answer into the prompt; it is excluded like the query itself, whatever the seed."""
    pool = POOL + [Example(6, "the  file\tfive ", "five")]
    t = few_shot.FewShotTemplate()
    for seed in range(10):
        _, shots = few_shot.build_prompts(QUERIES[1:2], pool, k=6, template=t, seed=seed)
        assert sorted(shots[0]) == [0, 1, 2, 3, 4, 5]
    _, shots = few_shot.build_prompts(QUERIES, pool, k=3, template=t, seed=0)
    assert shots == [few_shot.draw_shots(7, 3, 0, i, exclude={6} if i == 1 else ())
                     for i in range(3)]
    with pytest.raises(few_shot.FewShotError, match="only 6 examples"):
        few_shot.build_prompts(QUERIES[1:2], pool, k=7, template=few_shot.FewShotTemplate(),
                               seed=0)


def test_mixture_queries_draw_shots_from_their_own_entry():
    """Examples of a data.mixture name their entry: a query's shots are the same seeded draw
    over its own entry's pool examples (numbered within the entry), never another task's."""
    pool = [dataclasses.replace(e, entry="num") for e in POOL] + [
        Example(6 + i, f"colour {c}", c, "col") for i, c in enumerate(["red", "blue", "green"])]
    queries = [Example(0, "the file two", "two", "num"), Example(1, "colour blue", "blue", "col"),
               Example(2, "the file six", "six", "num")]
    t = few_shot.FewShotTemplate()
    for seed in range(5):
        _, shots = few_shot.build_prompts(queries, pool, k=2, template=t, seed=seed)
        assert shots[0] == few_shot.draw_shots(6, 2, seed, 0)
        # "colour blue" is also in the pool (index 7, the entry's 1): never its own shot.
        assert shots[1] == [6 + j for j in few_shot.draw_shots(3, 2, seed, 1, exclude=1)]
        assert sorted(shots[1]) == [6, 8]
        assert all(j < 6 for j in shots[2])
    # Queries that name no entry (a --few_shot_queries file) draw from the whole pool.
    _, shots = few_shot.build_prompts(QUERIES, pool, k=3, template=t, seed=0)
    assert shots == [few_shot.draw_shots(9, 3, 0, i) for i in range(3)]
    with pytest.raises(few_shot.FewShotError, match="entry 'col': 3 shots requested but the "
                                                    "pool has only 2 examples"):
        few_shot.build_prompts(queries[1:2], pool, k=3, template=t, seed=0)
    with pytest.raises(few_shot.FewShotError, match="entry 'new': 1 shots .* only 0 examples"):
        few_shot.build_prompts([Example(0, "x", "y", "new")], pool, k=1, template=t, seed=0)


def test_cut_at_stop():
    assert few_shot.cut_at_stop(" four Q: the value", ["Q:", "|"]) == "four"
    assert few_shot.cut_at_stop("a | b Q:", ["Q:", "|"]) == "a"
    assert few_shot.cut_at_stop("plain", ["Q:"]) == "plain"


def test_a_stop_string_begun_by_the_prompt_is_read_as_the_decoder_reads_it(vocab):
    """On token bytes (a piece's leading space kept, which decode drops at the start), and
    only where the match ends in the generated ids."""
    enc = lambda text: vocab.encode(text)
    begins = lambda prompt, out, stops: few_shot.begins_in_prompt(vocab, enc(prompt), out, stops)
    eq = [i for i in enc("a==") if vocab.token_bytes()[i] == b"="]
    assert eq, "a vocabulary with '=' as a piece of its own"
    assert begins("x =", eq, ["=="]) and begins("=", eq, ["==", "||||||"])  # a short prompt
    assert not begins("x =", enc(" ="), ["=="])  # "= =": the decoder did not stop
    assert not begins("x ==", enc(" b"), ["=="])  # within the prompt: not a stop
    assert not begins("x =", eq, ["Q:"])
    # an id without a token ends a match, in the prompt or the output (stop_strings' rule)
    past = len(vocab.token_bytes()) + 3
    assert begins("x =", eq + [past], ["=="])
    assert not begins("x =", [past] + eq, ["=="])
    assert not few_shot.begins_in_prompt(vocab, enc("x =") + [past], eq, ["=="])


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_batched_likelihood_equals_loaded_score(family, gpt, t5, vocab):
    lm = gpt if family == "gpt" else t5
    rng = np.random.default_rng(0)
    prompts = [[0] + list(rng.integers(3, 300, n)) for n in (3, 17, 1, 30, 9)]
    conts = [list(rng.integers(3, 300, n)) for n in (2, 5, 1, 11, 3)]
    if family == "t5":
        prompts = [p[1:] or [5] for p in prompts]
    got = likelihood.log_likelihoods(lm, prompts, conts, batch_size=8)
    eos = [1] if family == "t5" else []
    want = lm.score([p + eos for p in prompts], [c + eos for c in conts]) if family == "t5" \
        else lm.score(prompts, conts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.ptp(got) > 1.0  # different rows really score differently


def test_multiple_choice_picks_highest_loglik_of_loaded_score(gpt, vocab):
    queries = [Example(0, "the value two", "two"), Example(1, "the value six", "six"),
               Example(2, "the value one", "one")]
    metrics, records = few_shot.evaluate_choice(gpt, queries, POOL, few_shot.FewShotOptions(k=2))
    labels = sorted({e.targets for e in POOL})
    assert set(metrics) == {"accuracy", "accuracy_norm"}
    for q, r in zip(queries, records):
        assert r["choices"] == labels and len(r["shots"]) == 2
        ids = [0] + vocab.encode(r["prompt"])  # t5x_lite GPT: decoder start id first
        want = gpt.score([ids] * len(labels), [vocab.encode(c) for c in labels])
        np.testing.assert_allclose(r["log_likelihoods"], want, rtol=1e-5, atol=1e-4)
        assert r["prediction"] == labels[int(np.argmax(want))]
        lengths = np.array([len(vocab.encode(c)) for c in labels])
        assert r["prediction_norm"] == labels[int(np.argmax(want / lengths))]
    assert metrics["accuracy"] == pytest.approx(
        100 * np.mean([r["prediction"] == r["targets"] for r in records]))
    # Own choices per query; a target missing from them is an error.
    _, records = few_shot.evaluate_choice(gpt, queries[:1], POOL, few_shot.FewShotOptions(k=0),
                                          choices=[["two", "nine"]])
    assert records[0]["choices"] == ["two", "nine"]
    assert records[0]["prompt"] == "Q: the value two A:"
    with pytest.raises(few_shot.FewShotError, match="not among its choices"):
        few_shot.evaluate_choice(gpt, queries[:1], POOL, few_shot.FewShotOptions(),
                                 choices=[["one"]])
    # Records without choices (None) use the pool's and queries' targets; the others their own.
    _, records = few_shot.evaluate_choice(gpt, queries[:2], POOL, few_shot.FewShotOptions(k=0),
                                          choices=[None, ["six", "ten"]])
    assert [r["choices"] for r in records] == [labels, ["six", "ten"]]
    with pytest.raises(few_shot.FewShotError, match="one candidate .* makes multiple choice"):
        few_shot.evaluate_choice(gpt, queries[:1], [], few_shot.FewShotOptions(k=0))
    # Own choices that normalise alike are one answer: as two they tie, and either is right.
    t = queries[0].targets
    with pytest.raises(few_shot.FewShotError, match=rf"^query 0: choices '{t}' and '{t} ' are "
                       "one answer once normalised"):
        few_shot.evaluate_choice(gpt, queries[:1], POOL, few_shot.FewShotOptions(k=0),
                                 choices=[[t, f"{t} ", "nine"]])
    with pytest.raises(few_shot.FewShotError, match="one candidate .* makes multiple choice"):
        few_shot.evaluate_choice(gpt, queries[:1], POOL, few_shot.FewShotOptions(k=0),
                                 choices=[[t, t]])
    # Over a mixture, a query's default candidates are its entry's targets only.
    mixed = [dataclasses.replace(e, entry="num") for e in POOL] + [
        Example(6, "colour red", "red", "col"), Example(7, "colour blue", "blue", "col")]
    _, records = few_shot.evaluate_choice(
        gpt, [dataclasses.replace(queries[0], entry="num"), Example(1, "colour x", "red", "col")],
        mixed, few_shot.FewShotOptions(k=1))
    assert [r["choices"] for r in records] == [labels, ["blue", "red"]]
    assert [r["entry"] for r in records] == ["num", "col"]
    assert records[1]["shots"] in ([6], [7])
    # An empty candidate: one line naming the query and the choice (a decoder-only model
    # has no continuation token to score).
    with pytest.raises(few_shot.FewShotError, match="query 1: choice '' encodes to no tokens"):
        few_shot.evaluate_choice(gpt, queries[1:2], POOL, few_shot.FewShotOptions(k=0),
                                 choices=[["six", ""]])


def test_targets_that_normalise_alike_are_one_choice_and_count_right(gpt):
    """"yes" and "yes " encode alike, so as two candidates they tied and the argmax always
    took "yes": a "yes " query was never right (exact_match counts it right)."""
    pool = [Example(i, f"the value {w}", t) for i, (w, t) in enumerate(
        [("one", "yes"), ("two", "yes "), ("three", "no"), ("four", "no")])]
    queries = [Example(0, "the file one", "yes "), Example(1, "the file two", "yes")]
    metrics, records = few_shot.evaluate_choice(gpt, queries, pool, few_shot.FewShotOptions(k=0))
    assert [r["choices"] for r in records] == [["no", "yes"]] * 2
    right = [r["prediction"].strip() == r["targets"].strip() for r in records]
    assert metrics["accuracy"] == pytest.approx(100 * np.mean(right))


def test_a_choice_too_long_for_the_model_names_the_choice(vocab):
    small = eval_testing.random_loaded(dataclasses.replace(
        eval_testing.tiny_gpt(max_len=32), vocab_size=vocab.padded_vocab_size), vocab)
    with pytest.raises(few_shot.FewShotError, match=r"^query 0: choice 'one one .*' is \d+ "
                       r"tokens, which leave no room for a prompt in the model's max length 32"):
        few_shot.evaluate_choice(small, QUERIES[:1], POOL, few_shot.FewShotOptions(k=0),
                                 choices=[["two", "one " * 40]])


def test_generation_prompts_and_cuts_at_stop_strings(gpt, monkeypatch):
    seen = {}
    from t5x_lite.decoding import generate as gen
    real = gen.generate

    def spy(loaded, **kw):
        seen.update(kw)
        return real(loaded, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    opts = few_shot.FewShotOptions(k=1, max_new_tokens=8, metrics="exact_match")
    metrics, records = few_shot.evaluate_generation(gpt, QUERIES, POOL, opts)
    assert seen["method"] == "greedy" and seen["max_new_tokens"] == 8
    assert seen["stop_strings"] == ["Q:"]  # rows end there in the decoder
    for ids, r in zip(seen["input_ids"], records):
        assert ids == [0] + gpt.vocab.encode(r["prompt"])
        assert r["prediction"] == few_shot.cut_at_stop(r["raw_prediction"], ["Q:"])
    assert set(metrics) == {"exact_match"}
    # Decoding on past the stop strings and cutting after gives the same predictions.
    template = few_shot.FewShotTemplate("e {inputs} = {targets}")  # stops at "e"
    opts = few_shot.FewShotOptions(k=1, max_new_tokens=24, metrics="exact_match",
                                   template=template)
    _, early = few_shot.evaluate_generation(gpt, QUERIES, POOL, opts)
    _, late = few_shot.evaluate_generation(gpt, QUERIES, POOL, opts, stop_strings=[])
    assert [r["prediction"] for r in early] == [r["prediction"] for r in late]
    assert all(b["raw_prediction"].startswith(a["raw_prediction"]) for a, b in zip(early, late))
    assert any(len(a["raw_prediction"]) < len(b["raw_prediction"]) and "e" in a["raw_prediction"]
               for a, b in zip(early, late))
    # A stop string the prompt begins: "... =" and a generated "=" complete "==", where the
    # decoder stops (HF's rule); cut after decoding on, the prediction is the same, empty.
    template = few_shot.FewShotTemplate("{inputs} = {targets}", separator=" ==")
    opts = few_shot.FewShotOptions(k=1, max_new_tokens=6, metrics="exact_match",
                                   template=template)
    writes_eq = {(gpt.vocab.encode("=")[-1],): 100.0}
    _, early = few_shot.evaluate_generation(gpt, QUERIES[:1], POOL, opts, sequence_bias=writes_eq)
    _, late = few_shot.evaluate_generation(gpt, QUERIES[:1], POOL, opts, sequence_bias=writes_eq,
                                           stop_strings=[])
    assert early[0]["prompt"].endswith("=") and early[0]["raw_prediction"].strip() == "="
    assert late[0]["raw_prediction"].strip().startswith("==")
    assert early[0]["prediction"] == late[0]["prediction"] == ""


def test_long_gpt_prompts_keep_their_end_up_to_what_generate_allows(gpt):
    """prompt + max_new_tokens - 1 <= max_len (128): 100 new tokens leave 29 prompt tokens, the
    start id 0 and the last 28 of the text."""
    from t5x_lite.decoding import generate as gen
    ids = gpt.vocab.encode("the file two " * 20)
    prompt = few_shot._prompt_ids(gpt, "the file two " * 20, 100)
    assert prompt == [0] + ids[-28:]
    gen.check_prompts(gpt.config, [prompt], gen.DecodeOptions(max_new_tokens=100))


def test_bad_inputs(tmp_path, gpt):
    with pytest.raises(few_shot.FewShotError, match="must hold"):
        few_shot.FewShotTemplate("Q: {targets} A: {inputs}")
    with pytest.raises(few_shot.FewShotError, match="k must be >= 0"):
        few_shot.FewShotOptions(k=-1)
    with pytest.raises(few_shot.FewShotError, match="seed must be >= 0, got -1"):
        few_shot.FewShotOptions(seed=-1)  # numpy's seeds are not (a traceback before)
    with pytest.raises(few_shot.FewShotError, match="max_new_tokens must be >= 0"):
        few_shot.FewShotOptions(max_new_tokens=-2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"inputs": "a", "targets": "b"}\n{"inputs": "a", "targets": "b", '
                   '"choices": ["c"]}\n')
    with pytest.raises(few_shot.FewShotError, match="bad.jsonl:2"):
        few_shot.read_jsonl(bad)
    with pytest.raises(few_shot.FewShotError, match="no queries"):
        few_shot.evaluate_generation(gpt, [], POOL, few_shot.FewShotOptions())
    assert predictions.uses_start_token(gpt)


def test_read_jsonl_non_utf8_and_line_separators(tmp_path):
    binary = tmp_path / "queries.jsonl"
    binary.write_bytes(b'{"inputs": "a", "targets": "b"}\n\x00\x9f\xff binary')
    with pytest.raises(few_shot.FewShotError,
                       match=r"queries.jsonl is not UTF-8 text \(line 2: byte 0x9f\)"):
        few_shot.read_jsonl(binary)
    # A raw U+2028 / U+0085 inside a JSON string is text, not a line break; CRLF lines work.
    text = tmp_path / "pool.jsonl"
    text.write_bytes('{"inputs": "x\u2028y", "targets": "z\u0085w"}\r\n\r\n'
                     '{"inputs": "p", "targets": "q"}\r\n'.encode())
    assert few_shot.read_jsonl(text) == [
        {"inputs": "x\u2028y", "targets": "z\u0085w", "choices": None},
        {"inputs": "p", "targets": "q", "choices": None}]
