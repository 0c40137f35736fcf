"""Tiny random Hugging Face PyTorch models (T5 v1.0, T5 v1.1, GPT-2) for parity tests.

Built offline from configs nobody tuned for: odd widths, head_dim != d_model / heads, more
encoder than decoder layers, few relative-position buckets with a short max_distance (so the
log-spaced and clamped buckets are reached by ~30 tokens), odd epsilons. Every parameter is
re-randomized after construction, norm scales and biases included (HF starts them at 1 and 0),
so a tensor mapped to the wrong place, transposed or reshaped in the wrong order cannot hide.

Only the tests import this module (and torch / transformers).
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 203
T5_SIZES = dict(vocab_size=VOCAB, d_model=40, d_kv=12, d_ff=72, num_layers=3,
                num_decoder_layers=2, num_heads=5, relative_attention_num_buckets=16,
                relative_attention_max_distance=20, layer_norm_epsilon=3.7e-6, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
GPT2_SIZES = dict(vocab_size=VOCAB, n_embd=48, n_head=3, n_layer=3, n_positions=40, n_inner=88,
                  layer_norm_epsilon=2.3e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=5, eos_token_id=1)
KINDS = ("t5_v1_0", "t5_v1_1", "gpt2")


def build(kind: str, out_dir=None, seed: int = 0):
    """A random fp32 HF model in eval mode; saved with safetensors to `out_dir` when given.

    t5_v1_1 is truly untied: a fresh random `lm_head.weight` is assigned after construction
    (transformers 5.x ties T5 heads by default) and the config says tie_word_embeddings=False.
    """
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(**GPT2_SIZES, attn_implementation="eager"))
    elif kind in ("t5_v1_0", "t5_v1_1"):
        v11 = kind == "t5_v1_1"
        config = transformers.T5Config(
            **T5_SIZES, feed_forward_proj="gated-gelu" if v11 else "relu",
            tie_word_embeddings=not v11, attn_implementation="eager")
        model = transformers.T5ForConditionalGeneration(config)
        if v11:
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, T5_SIZES["d_model"]))
    else:
        raise ValueError(kind)
    _randomize(model, seed)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir, safe_serialization=True)
    return model


def _randomize(model, seed: int):
    _randomize_scaled(model, seed + 1, 0.5, relative_bias=True)  # HF's 0.02 for GPT-2 embeddings
    # would give logits too small to test


def padded_batch(rng: np.random.Generator, lengths, vocab: int = VOCAB):
    """Right-padded random ids in [2, vocab) (0 = pad) and the matching 0/1 mask, int64."""
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(2, vocab, n)
    return ids, (ids > 0).astype(np.int64)


def _long(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


def t5_forward(model, enc_ids, enc_mask, dec_ids, dec_mask) -> torch.Tensor:
    """HF T5 logits as a torch tensor (with autograd, unless called under no_grad)."""
    return model(input_ids=_long(enc_ids), attention_mask=_long(enc_mask),
                 decoder_input_ids=_long(dec_ids), decoder_attention_mask=_long(dec_mask)).logits


def gpt2_forward(model, ids, mask) -> torch.Tensor:
    return model(input_ids=_long(ids), attention_mask=_long(mask)).logits


def t5_logits(model, enc_ids, enc_mask, dec_ids, dec_mask) -> np.ndarray:
    with torch.no_grad():
        return t5_forward(model, enc_ids, enc_mask, dec_ids, dec_mask).float().numpy()


def gpt2_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return gpt2_forward(model, ids, mask).float().numpy()


def llama(tie: bool = False, kv_heads: int = 4, seed: int = 0, rope=None, **sizes):
    """A random HF LlamaForCausalLM (4 heads; `kv_heads` key / value heads), norm scales too;
    `rope`: its rope_parameters (default: plain RoPE, theta 5e5)."""
    return _llama_layout(transformers.LlamaForCausalLM, transformers.LlamaConfig, tie, kv_heads,
                         seed, rope, dict(attention_bias=False, mlp_bias=False, **sizes))


def mistral(sliding_window, tie: bool = False, kv_heads: int = 2, seed: int = 0, **sizes):
    """A random HF MistralForCausalLM: `llama`'s model with a sliding window (None: none)."""
    return _llama_layout(transformers.MistralForCausalLM, transformers.MistralConfig, tie,
                         kv_heads, seed, None, dict(sliding_window=sliding_window, **sizes))


def qwen2(tie: bool = False, kv_heads: int = 2, seed: int = 0, **config):
    """A random HF Qwen2ForCausalLM: `llama`'s model with query / key / value biases (random
    too); `config`: e.g. use_sliding_window / sliding_window / max_window_layers."""
    return _llama_layout(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, tie, kv_heads,
                         seed, None, config)


def _llama_layout(model_cls, config_cls, tie, kv_heads, seed, rope, extra):
    size = dict(vocab_size=96, hidden_size=48, num_attention_heads=4, head_dim=16,
                intermediate_size=80, num_hidden_layers=2)
    size.update(extra)
    torch.manual_seed(seed)
    hf = model_cls(config_cls(
        **size, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 5e5},
        tie_word_embeddings=tie, attn_implementation="eager")).eval()
    with torch.no_grad():  # norm scales too: 1 would hide a misplaced one
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return hf


def padded_generate(hf, prompts, n: int, left_pad: bool = True, transition: bool = False,
                    **kw):
    """HF `generate` on `prompts` padded into one batch with pad id 0 (left for a causal LM,
    right for T5's encoder), `max_new_tokens=n` (None: the model's generation config's) and
    `kw`: (each row's new tokens as a list,
    `sequences_scores` or None; with `transition`, each row's per-token log-probs instead,
    from HF's `compute_transition_scores`, beams included)."""
    p = max(map(len, prompts))
    ids = np.zeros((len(prompts), p), np.int64)
    mask = np.zeros_like(ids)
    for i, x in enumerate(prompts):
        sl = slice(p - len(x), p) if left_pad else slice(0, len(x))
        ids[i, sl], mask[i, sl] = x, 1
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pad_token_id=0, return_dict_in_generate=True, output_scores=True,
                          **({} if n is None else {"max_new_tokens": n}), **kw)
    new = out.sequences[:, p if left_pad else 1:]  # T5's output starts with its start id
    if transition:
        per_token = hf.compute_transition_scores(out.sequences, out.scores,
                                                 getattr(out, "beam_indices", None),
                                                 normalize_logits=True)
        return new.numpy().tolist(), per_token.numpy().tolist()
    return new.numpy().tolist(), getattr(out, "sequences_scores", None)


def cut_at(row, stop_ids):
    """`row` up to and including its first id in `stop_ids` (all of it without one)."""
    return next((row[:i + 1] for i, t in enumerate(row) if t in stop_ids), list(row))


def greedy_left_padded(hf, prompts, n, eos_token_id=None):
    """HF `generate(do_sample=False)` of a causal LM on `prompts` left-padded into one batch:
    each row's new tokens, cut after its first `eos_token_id` (None: the model's, uncut)."""
    rows, _ = padded_generate(hf, prompts, n, do_sample=False, eos_token_id=eos_token_id)
    return [cut_at(r, [eos_token_id]) for r in rows]


def export_matches(workdir, out, hf, ids, architecture: str) -> dict:
    """`convert --to_hf` of `workdir` into `out` loads with AutoModelForCausalLM as
    `architecture` and gives `hf`'s logits on `ids` exactly; returns the written config.json."""
    import json

    from t5x_lite import convert
    convert.workdir_to_hf(workdir, out)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager").eval()
    assert type(back).__name__ == architecture
    with torch.no_grad():
        ids = torch.tensor(ids)
        np.testing.assert_array_equal(back(ids).logits.numpy(), hf(ids).logits.numpy())
    return json.loads((out / "config.json").read_text())


def llama_as_gpt_modern(hf):
    """(gpt_modern config, params) of an HF Llama (or Mistral, or Qwen2 with every layer's
    window the same) under the README's mapping."""
    from t5x_lite import config as config_lib
    c = hf.config
    D, H, K, G = c.hidden_size, c.num_attention_heads, c.head_dim, c.num_key_value_heads
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    w = lambda name: sd[name].T
    params = {"token_embedder": {"embedding": sd["model.embed_tokens.weight"]},
              "decoder_norm": {"scale": sd["model.norm.weight"]}, "decoder": {}}
    if not c.tie_word_embeddings:
        params["lm_head"] = w("lm_head.weight")
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = {n: w(p + f"self_attn.{h}_proj.weight").reshape(D, heads, K)
                for n, h, heads in (("query", "q", H), ("key", "k", G), ("value", "v", G))}
        attn["out"] = w(p + "self_attn.o_proj.weight").reshape(H, K, D)
        if c.model_type == "qwen2":
            attn.update({f"{n}_bias": sd[p + f"self_attn.{h}_proj.bias"].reshape(heads, K)
                         for n, h, heads in (("query", "q", H), ("key", "k", G),
                                             ("value", "v", G))})
        params["decoder"][f"layers_{i}"] = {
            "pre_attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "pre_mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "self_attention": attn,
            "mlp": {"wi_0": w(p + "mlp.gate_proj.weight"), "wi_1": w(p + "mlp.up_proj.weight"),
                    "wo": w(p + "mlp.down_proj.weight")}}
    cfg = config_lib.gpt_modern(
        vocab_size=c.vocab_size, d_model=D, num_heads=H, head_dim=K, d_ff=c.intermediate_size,
        num_layers=c.num_hidden_layers, rope_theta=c.rope_parameters["rope_theta"],
        tie_embeddings=c.tie_word_embeddings, norm_eps=c.rms_norm_eps, max_len=256,
        num_kv_heads=None if G == H else G, sliding_window=getattr(c, "sliding_window", None),
        qkv_bias=c.model_type == "qwen2")
    return cfg, params


def masked_max_abs_diff(a, b, mask) -> float:
    """max |a - b| over the positions where mask [B, T] is set (logits [B, T, V])."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) * np.asarray(mask, bool)[..., None]))


def shift_right(ids):
    """T5 decoder inputs: targets shifted right with the start id 0 (padding stays 0)."""
    ids = np.asarray(ids)
    return np.concatenate([np.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)


def build_all(tmp_path_factory, kinds=KINDS) -> dict:
    """{kind: (torch model, saved directory)}, e.g. for a module-scoped fixture."""
    out = {}
    for kind in kinds:
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (build(kind, path), path)
    return out


def hf_logits(kind: str, model, seed: int = 1):
    """(numpy inputs, mask of real output positions [B, T], HF logits) for a padded batch.

    Encoder rows of 31/22/6 tokens and decoder rows of 27/12/3 (GPT-2: 40/23/9) reach the
    log-spaced and clamped relative-position buckets (16 buckets, max_distance 20).
    """
    rng = np.random.default_rng(seed)
    if kind == "gpt2":
        ids, mask = padded_batch(rng, [40, 23, 9])
        return {"input_ids": ids}, mask, gpt2_logits(model, ids, mask)
    enc, enc_mask = padded_batch(rng, [31, 22, 6])
    tgt, tgt_mask = padded_batch(rng, [27, 12, 3])
    dec = shift_right(tgt)
    inputs = {"input_ids": enc, "decoder_input_ids": dec, "targets": tgt}
    return inputs, tgt_mask, t5_logits(model, enc, enc_mask, dec, tgt_mask)


def hf_forward(kind: str, model, inputs) -> np.ndarray:
    """HF logits for inputs made by `hf_logits` (e.g. for a reloaded model)."""
    if kind == "gpt2":
        return gpt2_logits(model, inputs["input_ids"], inputs["input_ids"] > 0)
    return t5_logits(model, inputs["input_ids"], inputs["input_ids"] > 0,
                     inputs["decoder_input_ids"], inputs["targets"] > 0)


def train_spm(path, pieces: int) -> str:
    """A tiny T5-convention sentencepiece model (pad 0, eos 1, unk 2) written to `path`."""
    import io

    import sentencepiece as spm
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnoprstuw"), rng.integers(2, 8)))
             for _ in range(400)]
    sentences = [" ".join(rng.choice(words, 10)) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=pieces,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return str(path)


def assert_load_and_convert_refuse(hf_dir, workdir, error, message: str):
    """`t5x_lite.load(hf_dir)` and `convert --from_hf` into `workdir` both raise `error` with
    `message` in one line, and the conversion writes no checkpoint."""
    import re

    import pytest

    import t5x_lite
    from t5x_lite import convert
    for attempt in (lambda: t5x_lite.load(str(hf_dir)),
                    lambda: convert.hf_to_workdir(hf_dir, workdir)):
        with pytest.raises(error, match=re.escape(message)) as e:
            attempt()
        assert "\n" not in str(e.value)
    assert not (workdir / "checkpoints").exists()


def byte_level_bpe(size: int, specials, post_processor=None):
    """A byte-level BPE as GPT-2's (a `tokenizers.Tokenizer`) trained on random words to `size`
    ids, then `specials` added as special tokens (ids size, size + 1, ...); its post-processor
    `post_processor` (None: ByteLevel's, which adds nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnoprstuw"), rng.integers(2, 8)))
             for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = post_processor or processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((" ".join(rng.choice(words, 10)) for _ in range(300)), trainer)
    tok.add_special_tokens(list(specials))
    return tok


def _randomize_scaled(model, seed: int, embed_std: float, relative_bias: bool = False):
    """Biases ~0.1 N(0, 1), norm scales ~1 + 0.2 N(0, 1), GPT-2 embeddings (and with
    `relative_bias`, T5's relative-position biases) ~embed_std N(0, 1); other weights keep
    their HF init."""
    g = torch.Generator().manual_seed(seed)
    scaled = ("wte.weight", "wpe.weight") + (("relative_attention_bias.weight",)
                                             if relative_bias else ())
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias") and "relative" not in name:
                p.copy_(0.1 * noise)
            elif "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(scaled):
                p.copy_(embed_std * noise)


def _eos_readout(u, gain, strength):
    """A row that gives EOS a logit of about `strength` where the normed hidden state is ~u."""
    ug = u * gain
    return strength * ug / (ug @ ug) / np.sqrt(len(u))


def gpt2_ending_with(eos: int, vocab: int):
    """A random HF GPT-2 whose config says eos_token_id=eos, biased to end rows with it late
    (positions from 8 on lean towards it): rows of varied lengths that end."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_head=2, n_layer=2, n_positions=64, n_inner=64,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg)
    _randomize_scaled(model, 1, 0.15)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        u = torch.randn(32, generator=g)
        u = (u - u.mean()) / (u - u.mean()).norm()  # LayerNorm keeps a zero-mean direction
        model.transformer.wpe.weight[8:] += 6.0 * u
        model.transformer.wte.weight[eos] = _eos_readout(u, model.transformer.ln_f.weight, 12.0)
    return model.eval()


def t5_ending_with_eos(vocab: int):
    """A random untied HF T5 v1.1 whose rows end with EOS (1) at varied lengths: the last 30
    ids of the vocabulary lean the decoder towards EOS."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager")
    model = transformers.T5ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(7)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, 32, generator=g))  # untied
    _randomize_scaled(model, 1, 0.3)
    with torch.no_grad():
        u = torch.randn(32, generator=g)
        u /= u.norm()
        model.shared.weight[vocab - 30:] += 30.0 * u
        model.lm_head.weight[1] = _eos_readout(u, model.decoder.final_layer_norm.weight, 40.0)
    return model.eval()


def as_loaded(model):
    """The HF model's weights as a `loaded`-like object for decoding (decoding_testlib.loaded)."""
    import decoding_testlib
    from t5x_lite import hf_interop
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = hf_interop.model_config_from_hf(model.config.to_dict(), tensors)
    return decoding_testlib.loaded(cfg, hf_interop.params_from_hf(cfg, tensors))
