"""Llama / Mistral's sentencepiece `tokenizer.model`: text in and out of converted models.

References: HF's own tokenizer (`AutoTokenizer`, built from the same file) and `generate`, and
the sentencepiece library itself, which Meta's and Mistral's reference tokenizers call.
"""
import io
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers

import hf_reference as ref
import t5x_lite
from t5x_lite import convert, hf_interop
from t5x_lite.decoding.generate import DecodeError
from t5x_lite.vocab import LlamaVocabulary, Vocabulary, VocabularyError

# No text begins with a space: HF's tokenizer drops the extra "▁" sentencepiece gives one
# (a case of its own below).
TEXTS = ["abc de fgh", "café 12345 日本", "two  spaces\nand a newline", "k"]
N = 10


def _llama_spm(pieces: int = 300) -> bytes:
    """A tokenizer trained as Llama's was: BPE, unk / bos / eos 0 / 1 / 2 and no pad, byte
    fallback, digits split, no normalization, whitespace kept."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnoprstuw"), rng.integers(2, 8)))
             for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words, 10)) for _ in range(300)),
        model_writer=model, vocab_size=pieces, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2)
    return model.getvalue()


def _save(hf, path, proto, **settings):
    hf.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(proto)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         **settings}))
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A random HF Llama (embedding rows 320 > the tokenizer's 300 pieces, as HF pads them)
    with its tokenizer, the stop id 2."""
    hf = ref.llama(kv_heads=2, seed=3, vocab_size=320)
    hf.config.bos_token_id, hf.config.eos_token_id = 1, 2
    hf.generation_config.eos_token_id = 2
    return hf, _save(hf, tmp_path_factory.mktemp("llama"), _llama_spm())


def _hf_ids(path, texts):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok, [tok(t)["input_ids"] for t in texts]


def test_text_is_encoded_decoded_generated_and_scored_as_hf(src):
    hf, path = src
    m = t5x_lite.load(str(path))
    assert isinstance(m.vocab, LlamaVocabulary) and (m.start_id, m.eos_id) == (1, 2)
    tok, hf_ids = _hf_ids(path, TEXTS)
    assert [[m.start_id] + r for r in m.tokenize(TEXTS, add_eos=False)] == hf_ids
    # sentencepiece keeps a leading space as its own "▁" (Meta's reference tokenizer does too)
    sp = spm.SentencePieceProcessor(model_proto=(path / "tokenizer.model").read_bytes())
    hf_leading = tok(" abc")["input_ids"][1:]
    assert m.tokenize(" abc", add_eos=False) == [sp.encode(" abc")] != [hf_leading]
    # decoding: the text back, the stop id ends it, control ids and padded rows (>= 300) dropped
    assert m.detokenize([r[1:] for r in hf_ids]) == TEXTS == tok.batch_decode(
        hf_ids, skip_special_tokens=True)
    assert m.vocab.decode([1] + hf_ids[0][1:] + [310, 2, 7]) == TEXTS[0]

    out = m.generate(inputs=TEXTS, max_new_tokens=N)
    assert [o["ids"] for o in out] == ref.greedy_left_padded(hf, hf_ids, N, eos_token_id=2)
    assert [o["text"] for o in out] == [m.vocab.decode(o["ids"]) for o in out]
    # score: log p(continuation | BOS + prompt), against HF's logits on the same ids
    cont = m.tokenize("fgh de", add_eos=False)[0]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([hf_ids[0] + cont])).logits[0].double(), -1)
    p = len(hf_ids[0])
    expected = sum(logp[p - 1 + i, t].item() for i, t in enumerate(cont))
    np.testing.assert_allclose(m.score(TEXTS[0], "fgh de"), [expected], rtol=1e-4)


def test_convert_keeps_the_tokenizer_and_exports_it_back(src, tmp_path):
    hf, path = src
    convert.hf_to_workdir(path, tmp_path / "w")
    assert (tmp_path / "w" / hf_interop.TOKENIZER_SOURCE_CONFIG).exists()
    m = t5x_lite.load(str(tmp_path / "w"))
    assert isinstance(m.vocab, LlamaVocabulary) and m.start_id == 1
    _, hf_ids = _hf_ids(path, TEXTS)
    assert [o["ids"] for o in m.generate(inputs=TEXTS[:2], max_new_tokens=N)] == \
        ref.greedy_left_padded(hf, hf_ids[:2], N, eos_token_id=2)

    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == \
        (path / "tokenizer.model").read_bytes()
    assert _hf_ids(tmp_path / "hf", TEXTS)[1] == hf_ids
    # without the source's tokenizer_config.json: LlamaTokenizer's settings, the model's pieces
    (tmp_path / "w" / hf_interop.TOKENIZER_SOURCE_CONFIG).unlink()
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf2")
    written = json.loads((tmp_path / "hf2" / "tokenizer_config.json").read_text())
    assert (written["bos_token"], written["eos_token"], written["add_bos_token"]) == (
        "<s>", "</s>", True)
    assert _hf_ids(tmp_path / "hf2", TEXTS)[1] == hf_ids


def test_add_bos_token_false_is_followed_through_convert_and_export(src, tmp_path):
    from t5x_lite.evaluation import predictions
    hf, path = src
    d = _save(hf, tmp_path / "src", (path / "tokenizer.model").read_bytes(), add_bos_token=False)
    m = t5x_lite.load(str(d))
    _, hf_ids = _hf_ids(d, TEXTS[:2])
    assert m.start_id is None and hf_ids[0][0] != 1
    want = ref.greedy_left_padded(hf, hf_ids, N, eos_token_id=2)
    assert [o["ids"] for o in m.generate(inputs=TEXTS[:2], max_new_tokens=N)] == want
    # the workdir keeps the setting (hf_tokenizer_config.json), and so does its export
    convert.hf_to_workdir(d, tmp_path / "w")
    w = t5x_lite.load(str(tmp_path / "w"))
    assert w.start_id is None
    assert [o["ids"] for o in w.generate(inputs=TEXTS[:2], max_new_tokens=N)] == want
    assert predictions.prompt_ids(w, TEXTS[0], data_cfg=w.run_config.data,
                                  max_new_tokens=4) == hf_ids[0]
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    assert _hf_ids(tmp_path / "hf", TEXTS[:2])[1] == hf_ids


def test_a_transformers_5_save_without_the_bos_flag_exports_one(src, tmp_path):
    """transformers 5 saves a Llama tokenizer as tokenizer.json (its post-processor adds BOS)
    beside a tokenizer_config.json without add_bos_token; the export writes tokenizer.model,
    for which HF reads a missing flag as no BOS, so it writes the flag as load reads it."""
    hf, path = src
    d = _save(hf, tmp_path / "src", (path / "tokenizer.model").read_bytes())
    transformers.AutoTokenizer.from_pretrained(d).save_pretrained(d)
    assert "add_bos_token" not in json.loads((d / "tokenizer_config.json").read_text())
    _, hf_ids = _hf_ids(d, TEXTS)
    assert all(r[0] == 1 for r in hf_ids)
    convert.hf_to_workdir(d, tmp_path / "w")
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    written = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (written["add_bos_token"], written["add_eos_token"]) == (True, False)
    assert _hf_ids(tmp_path / "hf", TEXTS)[1] == hf_ids
    m = t5x_lite.load(str(tmp_path / "hf"))
    assert [[m.start_id] + r for r in m.tokenize(TEXTS, add_eos=False)] == hf_ids


def test_defaults_without_settings_and_the_stop_id_of_a_config_without_one(src, tmp_path):
    """No tokenizer_config.json: BOS first, as Meta's and Mistral's reference tokenizers do; a
    Llama config.json without eos_token_id stops at LlamaConfig's default 2, not at 1 (BOS)."""
    from t5x_lite.evaluation import predictions
    hf, path = src
    d = _save(hf, tmp_path / "src", (path / "tokenizer.model").read_bytes())
    (d / "tokenizer_config.json").unlink()
    config = json.loads((d / "config.json").read_text())
    del config["eos_token_id"]
    (d / "config.json").write_text(json.dumps(config))
    m = t5x_lite.load(str(d))
    assert (m.start_id, m.eos_id) == (1, 2)
    ids = m.tokenize(TEXTS[0], add_eos=False)[0]
    assert predictions.prompt_ids(m, TEXTS[0], data_cfg=m.run_config.data,
                                  max_new_tokens=4) == [1] + ids


def test_export_over_another_models_tokenizer_leaves_none_of_its_files(src, tmp_path):
    """A Llama export wrote tokenizer.model and tokenizer_config.json; a model without that
    tokenizer exported over it takes both away (HF would load a tokenizer from what is left)."""
    hf, path = src
    convert.hf_to_workdir(path, tmp_path / "w")
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    (tmp_path / "hf" / "special_tokens_map.json").write_text("{}")
    ref.llama(kv_heads=2, seed=4, vocab_size=320).save_pretrained(tmp_path / "bare")
    convert.hf_to_workdir(tmp_path / "bare", tmp_path / "w2")
    convert.workdir_to_hf(tmp_path / "w2", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]  # the second model's
    assert ((tmp_path / "hf" / "generation_config.json").read_bytes()
            == (tmp_path / "bare" / "generation_config.json").read_bytes())
    assert t5x_lite.load(str(tmp_path / "hf")).vocab is None


@pytest.mark.parametrize("change, error, message", [
    ({"settings": {"add_eos_token": True}}, hf_interop.InteropError,
     "add_eos_token=true is not supported (prompts would end with EOS)"),
    ({"settings": {"add_prefix_space": False}}, hf_interop.InteropError,
     "add_prefix_space=false is not supported"),
    ({"settings": {"bos_token": {"content": "<unk>"}}}, hf_interop.InteropError,
     "bos_token=\"<unk>\" is not the sentencepiece model's BOS piece '<s>'"),
    ({"config": "{"}, hf_interop.InteropError, "is not a JSON object (the tokenizer's settings)"),
    ({"settings": {"add_bos_token": "yes"}}, hf_interop.InteropError,
     'add_bos_token="yes" is not true or false'),
    ({"config": "[1]"}, hf_interop.InteropError, "is not a JSON object (the tokenizer's settings)"),
    ({"proto": b"not a model"}, VocabularyError, "not a sentencepiece model"),
    ({"proto": b""}, VocabularyError, "vocabulary file is empty"),
    ({"pieces": 400}, t5x_lite.checkpoints.CheckpointError,
     "has 400 ids but the model's embedding has only 320 rows"),
])
def test_bad_tokenizer_files_are_one_line_for_load_and_convert(src, tmp_path, change, error,
                                                               message):
    hf, path = src
    proto = change.get("proto", _llama_spm(change["pieces"]) if "pieces" in change else
                       (path / "tokenizer.model").read_bytes())
    d = _save(hf, tmp_path / "src", proto, **change.get("settings", {}))
    if "config" in change:
        (d / "tokenizer_config.json").write_text(change["config"])
    ref.assert_load_and_convert_refuse(d, tmp_path / "w", error, message)


def test_training_pipelines_refuse_a_llama_tokenizer_in_one_line(src):
    _, path = src
    with pytest.raises(VocabularyError, match=r"expected T5 ids pad/eos/unk = 0/1/2, got "
                       r"\(-1, 2, 0\): a tokenizer with its own special ids \(as Llama's\), "
                       "which `t5x_lite.load` decodes and scores with but the training and "
                       "evaluation data pipelines do not take"):
        Vocabulary(path / "tokenizer.model")


def test_few_shot_from_files_scores_as_hf_and_split_evaluation_is_refused(src, tmp_path):
    from t5x_lite.evaluation import EvalError, EvalSettings, outputs, run
    from t5x_lite.evaluation.few_shot import FewShotOptions
    hf, path = src
    convert.hf_to_workdir(path, tmp_path / "w")
    pairs = [{"inputs": "abc de", "targets": "fgh"}, {"inputs": "k", "targets": "de"}]
    for name, rows in (("q.jsonl", pairs), ("pool.jsonl", pairs[::-1])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = dict(few_shot_queries=str(tmp_path / "q.jsonl"),
                 few_shot_pool=str(tmp_path / "pool.jsonl"))
    [metrics] = run(None, tmp_path / "w", EvalSettings(
        few_shot=FewShotOptions(k=1, scoring="choice"), **files))
    assert metrics["num_predictions"] == 2
    tok = transformers.AutoTokenizer.from_pretrained(path)
    for rec in outputs.read_predictions(tmp_path / "w" / "eval" / "1shot_choice", 0):
        # each choice: log p(its ids | BOS + prompt ids) from HF's logits
        prompt = tok(rec["prompt"])["input_ids"]
        for choice, got in zip(rec["choices"], rec["log_likelihoods"]):
            cont = tok(choice)["input_ids"][1:]
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([prompt + cont])).logits[0].double(), -1)
            want = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont))
            np.testing.assert_allclose(got, want, rtol=1e-4)
    for settings in (EvalSettings(), EvalSettings(few_shot=FewShotOptions(k=1)),
                     EvalSettings(few_shot=FewShotOptions(k=1),
                                  few_shot_queries=files["few_shot_queries"])):
        with pytest.raises(EvalError, match="has an HF tokenizer .* evaluate it few-shot "
                           "from files"):
            run(None, tmp_path / "w", settings)


def test_added_tokens_past_the_pieces_are_named_in_a_warning(src, tmp_path, caplog):
    hf, path = src
    d = _save(hf, tmp_path / "src", (path / "tokenizer.model").read_bytes(),
              added_tokens_decoder={"1": {"content": "<s>"}, "300": {"content": "<|im_end|>"},
                                    "301": {"content": "<|im_start|>"}})
    m = t5x_lite.load(str(d))
    assert m.start_id == 1
    assert ("2 added tokens past the vocabulary's 300 ids ('<|im_end|>', '<|im_start|>'; ids "
            "300..301) are not read") in caplog.text
    # transformers 5 saves them in tokenizer.json only, which HF reads them from
    caplog.clear()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.save_pretrained(tmp_path / "v5")
    assert "added_tokens_decoder" not in json.loads(
        (tmp_path / "v5" / "tokenizer_config.json").read_text())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "v5")("<|im_end|>")[
        "input_ids"] == [1, 300]
    hf.save_pretrained(tmp_path / "v5")  # with the sentencepiece model, as Llama 2 ships it
    (tmp_path / "v5" / "tokenizer.model").write_bytes((path / "tokenizer.model").read_bytes())
    t5x_lite.load(str(tmp_path / "v5"))
    assert ("1 added token past the vocabulary's 300 ids ('<|im_end|>'; ids 300..300) is not "
            "read") in caplog.text


def test_chat_messages_are_refused_with_a_sentencepiece_vocabulary(src, tmp_path):
    """Sentencepiece would split a chat template's special tokens into pieces: messages are
    one error line (with or without a template), and no template is loaded for it."""
    hf, path = src
    d = _save(hf, tmp_path / "chat", (path / "tokenizer.model").read_bytes(),
              chat_template="{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]")
    m = t5x_lite.load(str(d))
    assert m.chat_template is None
    for lm in (m, t5x_lite.load(str(path))):
        with pytest.raises(DecodeError, match=r"^messages need a vocabulary that reads the chat "
                                              r"template's special tokens .*LlamaVocabulary"):
            lm.generate(messages=[{"role": "user", "content": "abc"}])
