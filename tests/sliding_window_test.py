"""Sliding-window attention (`model.sliding_window`, GPT family; HF Mistral's).

References: HF MistralForCausalLM (its mask: key k is seen by query q when q - window < k <= q)
for logits and greedy `generate`; the uncached forward pass for cached beam search, speculative
decoding and packed rows; a hand-built mask for what the window hides."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

import decoding_testlib
import hf_reference as ref
import t5x_lite
from t5x_lite import config as config_lib
from t5x_lite import convert, hf_interop
from t5x_lite.decoding import generate as gen
from t5x_lite.models import build_model

W = 5
N = 12
# prompts longer than the window, left-padded against each other in one batch
PROMPTS = [[5, 9, 3, 11, 12, 13, 14, 15, 16], [7, 8], [20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture(scope="module")
def mistral():
    hf = ref.mistral(W, seed=3)
    cfg, params = ref.llama_as_gpt_modern(hf)
    assert cfg.sliding_window == W
    return hf, decoding_testlib.loaded(cfg, jax.tree.map(np.asarray, params))


def _hf_greedy(hf, prompts):
    return ref.greedy_left_padded(hf, prompts, N)


@pytest.mark.parametrize("causal_blocks", [4, 1])
def test_logits_equal_hf_mistral(mistral, causal_blocks):
    hf, loaded = mistral
    cfg = dataclasses.replace(loaded.config, causal_blocks=causal_blocks)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(jax.jit(build_model(cfg).logits)(
        loaded.params, {"decoder_input_tokens": ids}))
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    # the window matters at these lengths: without it the logits are another model's
    full = build_model(dataclasses.replace(cfg, sliding_window=None))
    assert np.abs(np.asarray(jax.jit(full.logits)(
        loaded.params, {"decoder_input_tokens": ids})) - want).max() > 1e-2


def test_a_query_sees_only_the_window():
    """Changing a token changes the logits of the queries within W - 1 after it (per layer, so
    up to L (W - 1) positions on), and none before it; with one layer exactly W."""
    cfg = config_lib.gpt_modern(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48,
                                num_layers=1, sliding_window=W, max_len=32)
    loaded = decoding_testlib.loaded(cfg)
    logits = jax.jit(loaded.model.logits)
    ids = np.random.default_rng(1).integers(3, 64, (1, 20)).astype(np.int32)
    changed = ids.copy()
    changed[0, 6] += 1
    diff = np.abs(np.asarray(logits(loaded.params, {"decoder_input_tokens": ids}))
                  - np.asarray(logits(loaded.params, {"decoder_input_tokens": changed})))
    moved = np.flatnonzero(diff[0].max(-1) > 1e-6)
    np.testing.assert_array_equal(moved, np.arange(6, 6 + W))


def test_cached_greedy_equals_hf_mistral_generate(mistral):
    hf, loaded = mistral
    ours = gen.generate(loaded, input_ids=PROMPTS, max_new_tokens=N, batch_size=4)
    assert [r["ids"] for r in ours] == _hf_greedy(hf, PROMPTS)
    one = gen.generate(loaded, input_ids=PROMPTS[:1], max_new_tokens=N, batch_size=1)
    assert one[0]["ids"] == ours[0]["ids"]


def test_beam_scores_and_speculative_decoding_follow_the_window(mistral, monkeypatch):
    _, loaded = mistral
    beams = gen.generate(loaded, input_ids=PROMPTS[:2], method="beam", num_beams=3,
                         max_new_tokens=8, batch_size=2)
    decoding_testlib.assert_beams_score_their_log_probs(loaded, PROMPTS, beams)
    # short cache phases: the cache grows (and speculative rollbacks happen) past the window
    monkeypatch.setattr(gen, "MIN_PHASE", 2)
    monkeypatch.setattr(gen, "CACHE_PHASES", 6)
    plain = gen.generate(loaded, input_ids=PROMPTS, max_new_tokens=N, batch_size=4)
    draft = decoding_testlib.loaded(dataclasses.replace(loaded.config, num_layers=1), seed=7)
    spec = gen.generate(loaded, input_ids=PROMPTS, max_new_tokens=N, batch_size=4, draft=draft,
                        num_draft=3)
    assert [r["ids"] for r in spec] == [r["ids"] for r in plain]


def test_packed_rows_equal_each_sequence_alone():
    cfg = config_lib.gpt_modern(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48,
                                num_layers=2, sliding_window=3, max_len=32)
    loaded = decoding_testlib.loaded(cfg)
    logits = jax.jit(loaded.model.logits)
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, 64, n).astype(np.int32) for n in (7, 4, 6)]
    tokens = np.concatenate(seqs)[None]
    seg = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)])[None]
    pos = np.concatenate([np.arange(len(s)) for s in seqs])[None]
    packed = np.asarray(logits(loaded.params, {"decoder_input_tokens": tokens,
                                               "decoder_segment_ids": seg,
                                               "decoder_positions": pos}))
    for i, s in enumerate(seqs):
        alone = np.asarray(logits(loaded.params, {"decoder_input_tokens": s[None]}))
        np.testing.assert_allclose(packed[0][seg[0] == i + 1], alone[0], atol=2e-5)


def test_mistral_checkpoint_converts_decodes_as_hf_and_exports_back(tmp_path):
    hf = ref.mistral(W, seed=4)
    hf.save_pretrained(tmp_path / "src")
    cfg = convert.hf_to_workdir(tmp_path / "src", tmp_path / "w")
    assert (cfg.sliding_window, cfg.num_kv_heads) == (W, 2)
    ours = t5x_lite.load(str(tmp_path / "w")).generate(input_ids=PROMPTS, max_new_tokens=N)
    assert [r["ids"] for r in ours] == [_hf_greedy(hf, [p])[0] for p in PROMPTS]

    written = ref.export_matches(tmp_path / "w", tmp_path / "hf", hf, [PROMPTS[0] + PROMPTS[2]],
                                 "MistralForCausalLM")
    assert (written["model_type"], written["sliding_window"]) == ("mistral", W)
    assert "attention_bias" not in written


def test_mistral_configs_read_as_hf_reads_them():
    c = ref.mistral(None).config.to_dict()
    assert hf_interop.model_config_from_hf(c).sliding_window is None  # null: no window
    for key in ("sliding_window", "num_key_value_heads", "intermediate_size"):
        del c[key]  # MistralConfig's defaults, not LlamaConfig's
    c["num_attention_heads"] = 16  # so that its default 8 kv heads divide them
    cfg = hf_interop.model_config_from_hf(c)
    assert (cfg.sliding_window, cfg.num_kv_heads, cfg.d_ff) == (4096, 8, 14336)
    c["num_key_value_heads"] = None  # HF: as many as the heads
    assert hf_interop.model_config_from_hf(c).num_kv_heads is None
    llama = ref.llama(kv_heads=2).config.to_dict()
    llama["sliding_window"] = 4  # HF's Llama reads no window
    assert hf_interop.model_config_from_hf(llama).sliding_window is None
    with pytest.raises(hf_interop.InteropError,
                       match="^config.json: sliding_window=0 is not a positive integer$"):
        hf_interop.model_config_from_hf({**c, "sliding_window": 0})
    # HF's Mistral has no biases and reads neither key: a model built from them has none
    biased = {**ref.mistral(None).config.to_dict(), "attention_bias": True, "mlp_bias": True}
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**biased))
    assert not [n for n, _ in hf.named_parameters() if n.endswith(".bias")]
    assert not hf_interop.model_config_from_hf(biased).qkv_bias


def test_settings_it_cannot_build_are_one_line(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="sliding_window only applies to family 'gpt'"):
        config_lib.t5_1_1(sliding_window=4)
    with pytest.raises(config_lib.ConfigError, match="sliding_window must be positive"):
        config_lib.gpt_modern(sliding_window=0)
    gpt2 = config_lib.gpt2(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48,
                           num_layers=1, max_len=32, sliding_window=4)
    with pytest.raises(hf_interop.InteropError, match="sliding_window=4\\); to_hf exports"):
        convert.hf_config_from_model(gpt2)


def test_prefix_lm_decoding_follows_the_uncached_window(tmp_path):
    """Under the prefix-LM objective the window bounds only the past: prompt queries see the
    later prompt keys. Cached greedy decoding equals greedy over the uncached forward pass
    with the prompt flagged (`decoder_causal_attention`), the training pipeline's features."""
    from t5x_lite import checkpoints
    from t5x_lite.defaults import base_config
    cfg = config_lib.gpt_modern(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48,
                                num_layers=2, sliding_window=3, max_len=48)
    checkpoints.write_config(tmp_path, base_config(cfg, objective="prefix_lm", seq_len=32))
    checkpoints.save_params(tmp_path, decoding_testlib.random_params(cfg, seed=5), 0)
    lm = t5x_lite.load(str(tmp_path))
    assert lm.prefix_lm
    prompts = [[0, 5, 9, 13, 2, 40, 7, 1], [0, 11, 4, 1]]
    got = lm.generate(input_ids=prompts, max_new_tokens=8)
    forward = jax.jit(lm.model.logits)
    for prompt, row in zip(prompts, got):
        ids = list(prompt)
        for _ in range(8):  # right-padded to one length: padding changes no real position
            tokens = np.zeros((1, 24), np.int32)
            tokens[0, :len(ids)] = ids
            flags = np.zeros((1, 24), np.int32)
            flags[0, :len(prompt)] = 1
            logits = forward(lm.params, {"decoder_input_tokens": tokens,
                                         "decoder_causal_attention": flags})
            ids.append(int(np.argmax(logits[0, len(ids) - 1])))
            if ids[-1] == 1:
                break
        assert row["ids"] == ids[len(prompt):]


def test_query_blocks_skip_the_keys_before_the_window():
    """Causal query blocks also skip the keys no query of theirs sees: less work (XLA's FLOP
    count), and the full square's loss and gradients, also under dropout masks shared along
    the sequence (each block reads its keys' slice of the one mask)."""
    cfg = config_lib.gpt_modern(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48,
                                num_layers=2, sliding_window=3, max_len=64, dropout_rate=0.2,
                                dropout_broadcast=True, causal_blocks=8)
    params = decoding_testlib.random_params(cfg)
    ids = np.random.default_rng(4).integers(2, 64, (2, 64)).astype(np.int32)
    batch = {"decoder_input_tokens": ids, "decoder_target_tokens": ids}

    def grad_fn(c):
        model = build_model(c)
        return jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, jax.random.key(1))[0]))

    (loss, grads), (want, want_grads) = (grad_fn(cfg)(params),
                                         grad_fn(dataclasses.replace(cfg, causal_blocks=1))(params))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads,
                 want_grads)
    flops = lambda c: grad_fn(c).lower(params).compile().cost_analysis()["flops"]
    assert flops(cfg) < flops(dataclasses.replace(cfg, sliding_window=None))
