"""HF `tokenizer.json` (GPT-2's byte-level BPE, a Llama 3-style BOS template): text in and out
of converted decoder-only models, against HF's `AutoTokenizer` and `generate`."""
import json

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, processors

import hf_reference as ref
import t5x_lite
from t5x_lite import checkpoints, convert
from t5x_lite.hf_tokenizer import TokenizerJsonVocabulary
from t5x_lite.vocab import VocabularyError

TEXTS = ["abc de fgh", " leading space", "café 12345 日本 🙂", "two  spaces\nand a tab\t!",
         "ends<|endoftext|>k"]
N = 10
EOS = 300  # the added <|endoftext|>: the model's stop id


def _bpe(template: str | None = None) -> Tokenizer:
    """A byte-level BPE as GPT-2's (300 ids, then <|endoftext|> added as a special token);
    `template`: a TemplateProcessing single-text template with <|begin_of_text|> (id 301)."""
    return ref.byte_level_bpe(EOS, ["<|endoftext|>", "<|begin_of_text|>"], template and (
        processors.TemplateProcessing(single=template, special_tokens=[
            ("<|begin_of_text|>", 301), ("<|endoftext|>", EOS)])))


def _save(hf, path, tok: Tokenizer, tokenizer_class="GPT2Tokenizer"):
    hf.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tokenizer_class, "eos_token": "<|endoftext|>",
         "bos_token": "<|endoftext|>", "add_bos_token": False}))
    return path


def _gpt2(seed=0):
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                bos_token_id=EOS, eos_token_id=EOS,
                                attn_implementation="eager")).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    hf.generation_config.eos_token_id = EOS
    return hf


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    hf = _gpt2()
    return hf, _save(hf, tmp_path_factory.mktemp("gpt2"), _bpe())


def _hf_ids(path, texts):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok, [tok(t)["input_ids"] for t in texts]


def test_gpt2_text_is_encoded_decoded_and_generated_as_hf(src, tmp_path):
    hf, path = src
    m = t5x_lite.load(str(path))
    assert isinstance(m.vocab, TokenizerJsonVocabulary) and (m.start_id, m.eos_id) == (None, EOS)
    tok, hf_ids = _hf_ids(path, TEXTS)
    assert m.tokenize(TEXTS, add_eos=False) == hf_ids and EOS in hf_ids[-1]  # special in text
    assert m.detokenize(hf_ids[:4]) == TEXTS[:4] == tok.batch_decode(hf_ids[:4],
                                                                      skip_special_tokens=True)
    out = m.generate(inputs=TEXTS, max_new_tokens=N)
    want = ref.greedy_left_padded(hf, hf_ids, N, eos_token_id=EOS)
    assert [o["ids"] for o in out] == want
    assert [o["text"] for o in out] == [tok.decode([i for i in w if i != EOS],
                                                   skip_special_tokens=True) for w in want]

    # convert keeps tokenizer.json and tokenizer_config.json and writes them back
    convert.hf_to_workdir(path, tmp_path / "w")
    assert not (tmp_path / "w" / checkpoints.VOCAB_FILE).exists()
    back = t5x_lite.load(str(tmp_path / "w"))
    assert [o["ids"] for o in back.generate(inputs=TEXTS[:2], max_new_tokens=N)] == want[:2]
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    assert _hf_ids(tmp_path / "hf", TEXTS)[1] == hf_ids
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (path / name).read_bytes()
    # training refuses it as a source of weights: its ids are not the data pipeline's
    from t5x_lite.training.trainer import TrainingError, _check_source_vocab
    with pytest.raises(TrainingError, match="has an HF tokenizer.json"):
        _check_source_vocab(None, tmp_path / "w", "train.init_from")


def test_an_export_keeps_its_own_tokenizer_files_and_removes_another_models(src, tmp_path):
    hf, path = src
    own = _save(hf, tmp_path / "own", _bpe())
    extras = {"vocab.json": "{}", "merges.txt": "#version: 0.2", "special_tokens_map.json": "{}"}
    for name, text in extras.items():
        (own / name).write_text(text)
    convert.hf_to_workdir(own, tmp_path / "w")
    convert.workdir_to_hf(tmp_path / "w", own)  # back into its own directory: nothing lost
    assert all((own / name).read_text() == text for name, text in extras.items())
    # over a directory with another tokenizer: none of that one's files stay
    other = _save(ref.llama(kv_heads=2, vocab_size=320), tmp_path / "other",
                  _bpe("<|begin_of_text|> $A"), "PreTrainedTokenizerFast")
    (other / "vocab.json").write_text("{}")
    convert.workdir_to_hf(tmp_path / "w", other)
    assert {p.name for p in other.iterdir()} == {"config.json", "model.safetensors",
                                                 "generation_config.json", "tokenizer.json",
                                                 "tokenizer_config.json"}
    assert _hf_ids(other, TEXTS)[1] == _hf_ids(path, TEXTS)[1]


def test_a_bos_template_gives_the_start_id_as_hf(tmp_path):
    """Llama 3's tokenizer.json puts <|begin_of_text|> before every text with its
    post-processor: that is the prompt's start id."""
    hf = ref.llama(kv_heads=2, seed=5, vocab_size=320)
    hf.generation_config.eos_token_id = hf.config.eos_token_id = EOS
    path = _save(hf, tmp_path / "src", _bpe("<|begin_of_text|> $A"), "PreTrainedTokenizerFast")
    m = t5x_lite.load(str(path))
    tok, hf_ids = _hf_ids(path, TEXTS[:3])
    assert m.start_id == 301 and all(r[0] == 301 for r in hf_ids)
    assert [[301] + r for r in m.tokenize(TEXTS[:3], add_eos=False)] == hf_ids
    row = hf_ids[0] + hf_ids[1]  # a special token mid-row: dropped, as HF skips it
    assert m.detokenize([row]) == [tok.decode(row, skip_special_tokens=True)] == [
        TEXTS[0] + TEXTS[1]]
    assert [o["ids"] for o in m.generate(inputs=TEXTS[:3], max_new_tokens=N)] == \
        ref.greedy_left_padded(hf, hf_ids, N, eos_token_id=EOS)
    # score: log p(continuation | BOS + prompt) from HF's logits
    cont = m.tokenize(" fgh", add_eos=False)[0]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([hf_ids[0] + cont])).logits[0].double(), -1)
    want = sum(logp[len(hf_ids[0]) - 1 + i, t].item() for i, t in enumerate(cont))
    np.testing.assert_allclose(m.score(TEXTS[0], " fgh"), [want], rtol=1e-4)


def test_truncation_and_padding_saved_in_the_file_are_off_as_in_hf(tmp_path):
    """Files saved after enable_truncation / enable_padding carry them; HF's AutoTokenizer
    turns both off (the tokenizers object kept them: prompts cut at 4, rows padded)."""
    tok = _bpe()
    tok.enable_truncation(max_length=4)
    tok.enable_padding(length=12, pad_id=EOS, pad_token="<|endoftext|>")
    path = _save(_gpt2(), tmp_path / "src", tok)
    assert json.loads((path / "tokenizer.json").read_text())["truncation"]["max_length"] == 4
    _, hf_ids = _hf_ids(path, TEXTS[:3])
    assert max(map(len, hf_ids)) > 4 and len({len(r) for r in hf_ids}) > 1
    assert t5x_lite.load(str(path)).tokenize(TEXTS[:3], add_eos=False) == hf_ids


def test_a_sentencepiece_tokenizer_model_wins_over_tokenizer_json(src, tmp_path):
    """Llama 2 / Mistral directories ship both: the sentencepiece model is read (no extra
    package). A tokenizer.model that is no sentencepiece model (Llama 3's tiktoken file copied
    beside its tokenizer.json) leaves tokenizer.json to be read."""
    from t5x_lite.vocab import Vocabulary
    hf, path = src
    d = _save(hf, tmp_path / "both", _bpe())
    (d / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert isinstance(t5x_lite.load(str(d)).vocab, TokenizerJsonVocabulary)
    ref.train_spm(d / "tokenizer.model", 60)
    assert isinstance(t5x_lite.load(str(d)).vocab, Vocabulary)


def test_tokenizers_it_cannot_follow_leave_the_model_ids_only_with_a_warning(
        src, tmp_path, caplog, monkeypatch):
    """A post-processor adding an EOS after a text or two tokens before it, or no tokenizers
    package: load and convert go on (token ids only), a warning says why; the file is kept."""
    hf, _ = src
    for template, why in (("$A <|endoftext|>", "adds 0 token(s) before a text and 1 after it"),
                          ("<|begin_of_text|> <|endoftext|> $A", "adds 2 token(s) before")):
        d = _save(hf, tmp_path / template[:3], _bpe(template))
        assert t5x_lite.load(str(d)).vocab is None and why in caplog.text
        convert.hf_to_workdir(d, tmp_path / f"w{template[:3]}")
        assert (tmp_path / f"w{template[:3]}" / "tokenizer.json").exists()
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    m = t5x_lite.load(str(src[1]))
    assert m.vocab is None and "needs the tokenizers package (pip install tokenizers); " \
        "going on without a vocabulary (token ids only)" in caplog.text
    assert m.generate(input_ids=[[5, 6]], max_new_tokens=2)[0]["ids"]


@pytest.mark.parametrize("change, error, message", [
    ({"text": b"{\"version\": 1"}, VocabularyError, "not a tokenizer.json that HF's tokenizers "
                                                     "reads"),
    ({"text": b"\xff\xfe"}, VocabularyError, "not a tokenizer.json (not UTF-8 text)"),
    ({"text": b""}, VocabularyError, "vocabulary file is empty"),
    ({"rows": 256}, checkpoints.CheckpointError,
     "has 302 ids but the model's embedding has only 256 rows"),
])
def test_bad_tokenizer_json_is_one_line_for_load_and_convert(tmp_path, change, error, message):
    hf = _gpt2() if "rows" not in change else transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=change["rows"], n_positions=64, n_embd=32, n_layer=1,
                                n_head=4))
    d = _save(hf, tmp_path / "src", _bpe(change.get("template")))
    if "text" in change:
        (d / "tokenizer.json").write_bytes(change["text"])
    ref.assert_load_and_convert_refuse(d, tmp_path / "w", error, message)


def test_the_vocabulary_pickles_and_decodes_past_its_ids(src):
    import pickle
    _, path = src
    v = TokenizerJsonVocabulary(path / "tokenizer.json", eos_id=EOS)
    w = pickle.loads(pickle.dumps(v))
    ids = v.encode(TEXTS[0])
    assert w.encode(TEXTS[0]) == ids and w.vocab_size == v.vocab_size == 302
    # decoding ends at the stop id; ids past the tokenizer's (padded embedding rows) dropped
    assert w.decode(ids + [310] + [EOS] + ids) == TEXTS[0]
    with pytest.raises(VocabularyError, match="id -100 is negative"):
        w.decode([-100])
