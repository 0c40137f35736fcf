"""Stop strings (`decoding.stop_strings`): HF's rule, checked against HF's own
`StopStringCriteria` and `generate(stop_strings=...)`, and against the decoded text."""
import json
import types

import numpy as np
import pytest
import torch
import transformers
from tokenizers import processors
from transformers.generation.stopping_criteria import StopStringCriteria

import decoding_testlib
import hf_reference as ref
import hf_tokenizer_test
import llama_tokenizer_test
from t5x_lite import config as model_config
from t5x_lite.decoding import generate as gen
from t5x_lite.decoding import stop_strings
from t5x_lite.hf_tokenizer import TokenizerJsonVocabulary
from t5x_lite.vocab import LlamaVocabulary, Vocabulary

EOS = 300  # the byte-level BPE's added <|endoftext|>

# Per tokenizer kind: the letters texts are drawn from, and stop strings made of them.
KINDS = {
    "byte_level": ("ab c\n", ["a b", "\n\n", "ca", "c\nab"]),
    "sentencepiece": ("abcs ", ["ab", "s a", "ba", "c"]),
    "metaspace": ("abcs ", ["ab", "s a", "ba", " c"]),  # the same model as a tokenizer.json
    "byte_fallback": ("abé \n", ["é\n", "b é", "\n\n", "a"]),
}


def _tokenizers(kind: str, tmp_path):
    """(t5x_lite's vocabulary, HF's tokenizer) of one model."""
    if kind == "byte_level":
        tok = ref.byte_level_bpe(EOS, ["<|endoftext|>"])
        tok.save(str(tmp_path / "tokenizer.json"))
        return (TokenizerJsonVocabulary(tmp_path / "tokenizer.json", EOS),
                transformers.PreTrainedTokenizerFast(tokenizer_object=tok))
    if kind in ("sentencepiece", "metaspace"):
        path = ref.train_spm(tmp_path / "spiece.model", 200)
        config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0}
        ours = Vocabulary(path)
        if kind == "metaspace":  # HF's conversion: a Metaspace decoder, no EOS appended
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
            tok = transformers.AutoTokenizer.from_pretrained(tmp_path).backend_tokenizer
            tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
            tok.save(str(tmp_path / "tokenizer.json"))
            return (TokenizerJsonVocabulary(tmp_path / "tokenizer.json", 1),
                    transformers.PreTrainedTokenizerFast(tokenizer_object=tok))
    else:
        proto = llama_tokenizer_test._llama_spm()
        (tmp_path / "tokenizer.model").write_bytes(proto)
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}
        ours = LlamaVocabulary.from_proto(proto, add_bos=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return ours, transformers.AutoTokenizer.from_pretrained(tmp_path)


def _hits(stops, ids_BxT) -> np.ndarray:
    """Whether each token of each row completes a stop string, run as the decode loops do."""
    ids = np.asarray(ids_BxT, np.int32)
    state = stop_strings.initial_state(stops, ids.shape[:1])
    _, hits = stop_strings.advance_all(stops, state, ids)
    return np.asarray(hits)


def _first_in_text(vocab, ids, strings) -> int | None:
    """The first t for which the decoded ids[:t + 1] hold a stop string (None: never)."""
    return next((t for t in range(len(ids))
                 if any(s in vocab.decode(ids[:t + 1]) for s in strings)), None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_equal_hf_criterion_and_the_decoded_text(kind, tmp_path):
    vocab, hf_tok = _tokenizers(kind, tmp_path)
    letters, strings = KINDS[kind]
    assert StopStringCriteria._get_stop_string_matching_mode(hf_tok) == (
        kind if kind.startswith("byte") else None)
    rng = np.random.default_rng(0)
    rows = [hf_tok("".join(rng.choice(list(letters), 100)), add_special_tokens=False).input_ids
            for _ in range(24)]
    t = min(map(len, rows))
    ids = np.array([r[:t] for r in rows])
    hits = _hits(stop_strings.tables(vocab.token_bytes(), strings, vocab.vocab_size), ids)

    criterion = StopStringCriteria(hf_tok, strings)
    want = np.stack([criterion(torch.tensor(ids[:, :j + 1]), None).numpy()
                     for j in range(t)], 1)
    np.testing.assert_array_equal(hits, want)
    assert 0.05 < hits.mean() < 0.9
    for s in strings:  # each string completes somewhere, alone
        alone = _hits(stop_strings.tables(vocab.token_bytes(), [s], vocab.vocab_size), ids)
        assert alone.any() and not (alone & ~hits).any()
    # A row's first completion is where its decoded text first holds a stop string (not one
    # that begins with a space: `decode` drops a text's leading space, HF's match keeps it).
    kept = [s for s in strings if s == s.lstrip()]
    kept_hits = _hits(stop_strings.tables(vocab.token_bytes(), kept, vocab.vocab_size), ids)
    for row, hit in zip(ids.tolist(), kept_hits):
        first = int(np.argmax(hit)) if hit.any() else None
        assert first == _first_in_text(vocab, row, kept)


def test_an_id_without_a_token_ends_a_partial_match_as_in_hf(tmp_path):
    """Embedding rows past the tokenizer (a model padded past it) have no text: HF's criterion
    reads them as a token that matches nothing, so "a", such an id, "b" is no "ab" (it was,
    as empty text) while "a", "b" is."""
    vocab, hf_tok = _tokenizers("byte_level", tmp_path)
    size = vocab.vocab_size + 20
    a, b = (hf_tok(x, add_special_tokens=False).input_ids for x in ("a", "b"))
    ids = np.array([a + [size - 5] + b, a + b + b], np.int32)
    hits = _hits(stop_strings.tables(vocab.token_bytes(), ["ab"], size), ids)
    criterion = StopStringCriteria(hf_tok, ["ab"])
    want = np.stack([criterion(torch.tensor(ids[:, :j + 1]), None).numpy()
                     for j in range(ids.shape[1])], 1)
    np.testing.assert_array_equal(hits, want)
    assert not hits[0].any() and hits[1].any()


def test_token_bytes_equal_hf_clean_vocabulary(tmp_path):
    """Each token's text as HF's stop-string matching cleans it, special tokens included."""
    for kind in KINDS:
        (tmp_path / kind).mkdir()
        vocab, hf_tok = _tokenizers(kind, tmp_path / kind)
        mode = StopStringCriteria._get_stop_string_matching_mode(hf_tok)
        texts, ids = StopStringCriteria.clean_tokenizer_vocab(hf_tok,
                                                              stop_string_matching_mode=mode)
        ours = vocab.token_bytes()
        want = [x if isinstance(x, bytes) else x.encode() for x in texts]
        assert len(ids) > 190 and [ours[i] for i in ids] == want, kind
        special = {i for i, t in hf_tok.added_tokens_decoder.items() if t.special}
        assert special and all(ours[i] for i in special)  # spelled: "</s>", "<|endoftext|>"


@pytest.mark.parametrize("kind, special", [("byte_level", "<|endoftext|>"),
                                           ("sentencepiece", "</s>")])
def test_a_stop_string_may_spell_a_special_token(kind, special, tmp_path):
    """As in HF, special tokens are spelled as written: "<|endoftext|>" completes at that
    token, and "b<|endoftext|>" after a "b"."""
    vocab, hf_tok = _tokenizers(kind, tmp_path)
    sid = hf_tok.convert_tokens_to_ids(special)
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(16):
        row = hf_tok("".join(rng.choice(list("ab cs"), 30)), add_special_tokens=False).input_ids
        for at in rng.integers(0, len(row), 3):
            row.insert(int(at), sid)
        rows.append(row[:20])
    ids = np.array(rows)
    strings = [special, "b" + special]
    hits = _hits(stop_strings.tables(vocab.token_bytes(), strings, vocab.vocab_size), ids)
    criterion = StopStringCriteria(hf_tok, strings)
    want = np.stack([criterion(torch.tensor(ids[:, :j + 1]), None).numpy()
                     for j in range(ids.shape[1])], 1)
    np.testing.assert_array_equal(hits, want)
    np.testing.assert_array_equal(hits, ids == sid)


def test_state_machine_equals_occurrences_in_the_bytes():
    """Random tokens (empty ones included) over a few bytes: a token completes a string when
    an occurrence of it in the row's bytes ends inside that token. Ids past the tokens have
    none, which breaks every occurrence across them: read as a byte no string holds."""
    rng = np.random.default_rng(1)
    tokens = [bytes(rng.choice(list(b"ab\n"), rng.integers(0, 5)).tolist()) for _ in range(60)]
    assert b"" in tokens and max(map(len, tokens)) == 4
    strings = ["ab", "a\nb", "b", "aab\n\nab", "\n\n", "b" * 32]
    ids = rng.integers(0, 64, (64, 40))
    hits = _hits(stop_strings.tables(tokens, strings, 64), ids)
    padded = tokens + [b"\0"] * 4
    want = np.zeros_like(hits)
    for b, row in enumerate(ids):
        text = b""
        for t, i in enumerate(row):
            before, text = len(text), text + padded[i]
            want[b, t] = any(text.find(s.encode(), max(0, before - len(s) + 1)) >= 0
                             for s in strings)
    np.testing.assert_array_equal(hits, want)
    assert want.mean() > 0.2


# ---------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A converted random GPT-2 with a byte-level BPE, and HF's model and tokenizer."""
    hf = hf_tokenizer_test._gpt2()
    tok = ref.byte_level_bpe(EOS, ["<|endoftext|>"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    vocab = TokenizerJsonVocabulary(path, EOS)
    loaded = types.SimpleNamespace(**{**vars(ref.as_loaded(hf)), "vocab": vocab,
                                      "stop_ids": (EOS,)})
    return loaded, hf, transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


PROMPTS = ["ab cd efg", "rst uw", "a", "mno prs tuw ab"]
N = 16
NGRAM = 2  # no repeated bigram: the random model's greedy text is varied


def test_greedy_and_speculative_stop_as_hf_generate(gpt2):
    m, hf, tok = gpt2
    ids = [tok(p).input_ids for p in PROMPTS]
    plain = gen.generate(m, input_ids=ids, max_new_tokens=N, no_repeat_ngram_size=NGRAM)
    # Stop strings from the middle of two rows' texts (so rows stop early, at different steps).
    stops = [plain[0]["text"][6:8], plain[3]["text"][9:12]]
    out = gen.generate(m, input_ids=ids, max_new_tokens=N, no_repeat_ngram_size=NGRAM,
                       stop_strings=stops)
    stopped = 0
    for p, o, full in zip(ids, out, plain):
        want = hf.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False,
                           no_repeat_ngram_size=NGRAM, stop_strings=stops, tokenizer=tok,
                           eos_token_id=EOS, pad_token_id=EOS)[0, len(p):].tolist()
        assert o["ids"] == want and full["ids"][:len(want)] == want
        if len(want) < len(full["ids"]) and want[-1] != EOS:  # stopped by a string
            stopped += 1
            assert o["finished"] and any(s in o["text"] for s in stops)
            assert o["text"] == tok.decode(want)  # keeps the completing token
    assert stopped >= 2
    # Speculative decoding with proposals all accepted (the target as its own draft), partly
    # accepted (a slightly perturbed draft; prompt lookup): the stop state follows.
    noisy = hf_tokenizer_test._gpt2()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in noisy.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    noisy = types.SimpleNamespace(**{**vars(m), **vars(ref.as_loaded(noisy))})
    tokens, lengths = gen.pack_prompts(gen.model_config(m), ids, len(ids))
    for kw in ({"draft": m}, {"draft": noisy}, {"prompt_lookup_num_tokens": 3}):
        spec = gen.generate(m, input_ids=ids, max_new_tokens=N, no_repeat_ngram_size=NGRAM,
                            stop_strings=stops, num_draft=3, **kw)
        assert [o["ids"] for o in spec] == [o["ids"] for o in out], kw
        options = gen.DecodeOptions(max_new_tokens=N, no_repeat_ngram_size=NGRAM, num_draft=3,
                                    **{k: v for k, v in kw.items() if k != "draft"})
        _, stats = gen.decode_batch(m, tokens, lengths, options, draft=kw.get("draft"))
        accepted = float(stats["accepted_per_iteration"])
        assert accepted == 3 if kw.get("draft") is m else 0 < accepted < 3, kw


def test_strings_begun_in_the_prompt_end_as_in_hf_generate(gpt2):
    """HF reads the prompt too: a string that begins in a prompt's text and ends in its first
    generated token stops the row there (greedy, speculative, and HF's beam search); one that
    lies within a prompt does not. Each row against HF `generate` on that prompt alone."""
    m, hf, tok = gpt2
    ids = [tok(p).input_ids for p in PROMPTS]
    kw = dict(input_ids=ids, max_new_tokens=N, no_repeat_ngram_size=NGRAM)
    plain = gen.generate(m, **kw)
    pad = m.vocab.token_bytes()[0].decode()  # the left padding's id, 0, read as text
    stops = [PROMPTS[0][-2:] + plain[0]["text"][:1], PROMPTS[3][-3:] + plain[3]["text"][:1],
             PROMPTS[1][:3], pad + PROMPTS[2] + plain[2]["text"][:1]]
    assert not any(stops[2] in o["text"] for o in plain)  # within prompt 1 only
    assert len(ids[2]) < max(map(len, ids))  # padded in the batch
    hf_kw = dict(max_new_tokens=N, no_repeat_ngram_size=NGRAM, stop_strings=stops,
                 tokenizer=tok, eos_token_id=EOS, pad_token_id=EOS)
    out = gen.generate(m, stop_strings=stops, **kw)
    with torch.no_grad():
        for p, o in zip(ids, out):
            assert o["ids"] == hf.generate(torch.tensor([p]), do_sample=False,
                                           **hf_kw)[0, len(p):].tolist()
    assert [len(o["ids"]) for o in out][::3] == [1, 1] and min(len(out[1]["ids"]),
                                                               len(out[2]["ids"])) > 1
    for spec in ({"draft": m, "num_draft": 3}, {"prompt_lookup_num_tokens": 3}):
        spec_out = gen.generate(m, stop_strings=stops, **kw, **spec)
        assert [o["ids"] for o in spec_out] == [o["ids"] for o in out], spec
    beams = gen.generate(m, stop_strings=stops, method="beam", num_beams=3, beam_rule="hf",
                         **kw)
    with torch.no_grad():
        for p, o in zip(ids, beams):
            want = hf.generate(torch.tensor([p]), num_beams=3, num_return_sequences=3,
                               do_sample=False, **hf_kw)[:, len(p):].tolist()
            for beam, w in zip(o, want, strict=True):  # HF pads with EOS after an end
                assert w[:len(beam["ids"])] == beam["ids"] and set(w[len(beam["ids"]):]) <= {EOS}
    assert len(beams[0][0]["ids"]) == 1


def test_samples_stop_at_the_first_completion_of_the_same_samples(gpt2):
    """Samples are keyed by (seed, row, step): with stop strings each is the same sample cut
    after its first token whose decoded text completes one."""
    m, _, tok = gpt2
    ids = [tok(p).input_ids for p in PROMPTS]
    kw = dict(input_ids=ids, max_new_tokens=N, method="sample", temperature=1.5,
              num_samples=4, seed=3)
    plain = gen.generate(m, **kw)
    stops = ["a", "b c"]
    for method_kw in ({}, {"draft": m, "num_draft": 2}):
        out = gen.generate(m, stop_strings=stops, **kw, **method_kw)
        cut = 0
        for rows_plain, rows in zip(plain, out):
            for full, o in zip(rows_plain, rows):
                full_ids = [i for i in full["ids"] if i != EOS]
                first = _first_in_text(m.vocab, full_ids, stops)
                want = full["ids"] if first is None else full["ids"][:first + 1]
                if method_kw:  # speculative samples differ: check the rule on its own
                    first = _first_in_text(m.vocab, o["ids"], stops)
                    assert first is None or first == len(o["ids"]) - 1
                    continue
                assert o["ids"] == want
                cut += first is not None and first + 1 < len(full["ids"])
        assert method_kw or cut >= 4


def test_beams_end_at_their_first_completion(gpt2):
    m, _, tok = gpt2
    ids = [tok(p).input_ids for p in PROMPTS]
    plain = gen.generate(m, input_ids=ids, max_new_tokens=N, method="beam", num_beams=3)
    stops = [plain[0][0]["text"][3:5], plain[2][1]["text"][4:6]]
    out = gen.generate(m, input_ids=ids, max_new_tokens=N, method="beam", num_beams=3,
                       stop_strings=stops)
    by_string = 0
    for beams in out:
        for beam in beams:
            first = _first_in_text(m.vocab, [i for i in beam["ids"] if i != EOS], stops)
            if beam["ids"][-1] == EOS or not beam["finished"]:
                assert first is None  # no stop string before EOS / the budget
            else:
                assert first == len(beam["ids"]) - 1
                by_string += 1
    assert by_string >= 4 and [b["ids"] for b in out[0]] != [b["ids"] for b in plain[0]]


def test_t5_with_a_sentencepiece_vocabulary(tmp_path):
    """T5 decoding (greedy and beam) with the sentencepiece `Vocabulary`: greedy with stop
    strings is the greedy output cut at the first token whose decoded text holds one."""
    vocab = Vocabulary(ref.train_spm(tmp_path / "spiece.model", 120), extra_ids=4)
    cfg = model_config.t5_1_1(vocab_size=128, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                              num_layers=2, num_decoder_layers=2, dtype="float32")
    m = decoding_testlib.loaded(cfg, vocab=vocab, seed=2)
    prompts = [vocab.encode(t) + [1] for t in ("abc de", "rst uw ab", "m")]
    plain = gen.generate(m, input_ids=prompts, max_new_tokens=N, no_repeat_ngram_size=NGRAM)
    texts = [o["text"] for o in plain]
    stops = [texts[0][3:5], texts[1][4:6]]
    out = gen.generate(m, input_ids=prompts, max_new_tokens=N, no_repeat_ngram_size=NGRAM,
                       stop_strings=stops)
    cut = 0
    for full, o in zip(plain, out):
        body = full["ids"][:-1] if full["finished"] else full["ids"]
        first = _first_in_text(vocab, body, stops)
        assert o["ids"] == (full["ids"] if first is None else full["ids"][:first + 1])
        cut += first is not None
    assert cut >= 2
    beams = gen.generate(m, input_ids=prompts, max_new_tokens=N, method="beam", num_beams=2,
                         stop_strings=stops)
    for beam in (b for row in beams for b in row):
        if beam["finished"] and beam["ids"][-1] != 1:
            assert _first_in_text(vocab, beam["ids"], stops) == len(beam["ids"]) - 1


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("value, want", [
    (["\n\n", "Q:", "\n\n"], ("\n\n", "Q:")),
    ("\n", ("\n",)),
    ('["\\n\\n", "Q:"]', ("\n\n", "Q:")),  # the flag's and the config's JSON text
    ("[END]", ("[END]",)),  # not JSON: one string
    ('["a"]x', ('["a"]x',)),
    ("", ()),
    ([], ()),
])
def test_option_forms(value, want):
    options = gen.DecodeOptions(stop_strings=value)
    assert options.stop_strings == want
    assert gen.DecodeOptions(stop_strings=gen.sequence_option_text(
        "stop_strings", options.stop_strings)).stop_strings == want


@pytest.mark.parametrize("value, message", [
    ([""], "must be 1 to 32 bytes"),
    (["é" * 17], "must be 1 to 32 bytes"),
    ([5], "not a str"),
    ("[1, 2]", "not a str"),
    (["a\udc80"], "lone surrogate"),
    (5, "must be strings"),
])
def test_bad_options_are_one_line(value, message):
    with pytest.raises(gen.DecodeError, match=message) as e:
        gen.DecodeOptions(stop_strings=value)
    assert "\n" not in str(e.value).replace(repr("\n"), "")


def test_a_model_without_a_vocabulary_refuses_stop_strings(gpt2):
    m = types.SimpleNamespace(**{**vars(gpt2[0]), "vocab": None})
    with pytest.raises(gen.DecodeError, match="stop_strings need the model's vocabulary"):
        gen.generate(m, input_ids=[[5, 6]], max_new_tokens=4, stop_strings=["a"])
