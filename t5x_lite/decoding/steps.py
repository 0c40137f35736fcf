"""Model-specific halves of decoding: prefill the prompt, and the cached `tokens_to_logits` step.

Decoder-only (GPT): prompts are LEFT-padded to a common length P so every row's last prompt
token sits in the same slot; `token_valid` masks the padding keys and each row gets its own
position ids (0 at its first real token). The prefill writes the whole prompt in one pass. Later
steps derive each row's next position from the cache itself (the number of valid keys before the
cursor), so the step needs no per-row state and stays correct after a speculative rollback.
For a model trained with objective prefix_lm (`prefix_lm=True`) the prompt is its prefix: the
prefill's queries see every prompt key (bidirectional, T5X PrefixLM); later steps stay causal.

Encoder-decoder (T5): prompts are RIGHT-padded encoder inputs (0 = pad). The encoder runs once;
the prefill feeds the decoder start token 0 with the encoder output, which makes the decode
module project and cache the cross-attention K/V; later steps pass `encoded=None` and only the
(expanded) encoder padding mask.

All functions here are traced inside the jitted decode functions of `generate.py`.

Shape legend: B rows, P prompt length, S encoder length, L cache length, T chunk length, V vocab.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite.config import ModelConfig
from t5x_lite.decoding import cache as cache_lib
from t5x_lite.gpt import GPT
from t5x_lite.t5 import T5
from t5x_lite.transformer import unstack_layers


def _zero_cache(init_fn):
    abstract = jax.eval_shape(init_fn)["cache"]
    return cache_lib.zeros_like_abstract(abstract)


def left_pad_valid(lengths_B, p: int):
    """[B, P] True on the last `length` slots of each row (left padding)."""
    return jnp.arange(p)[None, :] >= (p - lengths_B)[:, None]


# ------------------------------------------------------------------------------------- GPT
def gpt_step_fn(cfg: ModelConfig, params):
    """`tokens_to_logits(ids_BxT, cache, positions_BxT=None, token_valid_BxT=None,
    prefix_BxT=None, last_only=False)` (`prefix_BxT`: prefix-LM flags of the chunk, see
    `DecodeCursor`; `last_only`: the last position's logits only, [B, 1, V])."""
    module = GPT(cfg, decode=True)
    max_pos = cfg.max_len - 1 if cfg.position == "learned" else None

    def tokens_to_logits(ids_BxT, cache, positions_BxT=None, token_valid_BxT=None,
                         prefix_BxT=None, last_only=False):
        if positions_BxT is None:
            positions_BxT = (cache_lib.valid_before_cursor(cache)[:, None]
                             + jnp.arange(ids_BxT.shape[1]))
        # Padding slots have no position (clip the -1s); a speculative draft may look past the
        # last learned position, for tokens beyond the budget that are thrown away anyway.
        positions_BxT = jnp.clip(positions_BxT, 0, max_pos)
        logits, mutated = module.apply(
            {"params": params, "cache": cache}, ids_BxT, decoder_positions=positions_BxT,
            token_valid=token_valid_BxT, decoder_causal_attention=prefix_BxT,
            last_only=last_only, mutable=["cache"])
        return logits, mutated["cache"]

    return tokens_to_logits


def gpt_prefill(cfg: ModelConfig, params, prompt_BxP, lengths_B, cache_len: int,
                prefix_lm: bool = False):
    """Runs left-padded prompts through a fresh cache of `cache_len` slots.

    `prefix_lm`: the prompt is the prefix of a prefix-LM model (attended bidirectionally).

    Returns:
      (logits of the last prompt position [B, V], cache, step function).
    """
    b, p = prompt_BxP.shape
    module = GPT(cfg, decode=True)
    cache = _zero_cache(lambda: module.init(jax.random.key(0),
                                            jnp.zeros((b, cache_len), jnp.int32)))
    step = gpt_step_fn(cfg, params)
    valid_BxP = left_pad_valid(lengths_B, p)
    positions_BxP = jnp.cumsum(valid_BxP, axis=1) - 1
    # left-padded: every row's last prompt token is at P - 1
    logits_Bx1xV, cache = step(prompt_BxP, cache, positions_BxP, valid_BxP,
                               valid_BxP if prefix_lm else None, last_only=True)
    return logits_Bx1xV[:, -1], cache, step


# ------------------------------------------------------------------------------------- T5
def t5_step_fn(cfg: ModelConfig, params, encoder_mask_BxS):
    module = T5(cfg, decode=True)

    def tokens_to_logits(ids_BxT, cache):
        logits, mutated = module.apply(
            {"params": params, "cache": cache}, ids_BxT, None, encoder_mask_BxS,
            method=T5.decode_logits, mutable=["cache"])
        return logits, mutated["cache"]

    return tokens_to_logits


def t5_prefill(cfg: ModelConfig, params, encoder_BxS, cache_len: int):
    """Encodes right-padded inputs once and feeds the start token.

    Returns:
      (logits for the first target token [B, V], cache incl. cross-attention K/V,
       encoder mask [B, S]).
    """
    b = encoder_BxS.shape[0]
    encoded_BxSxD = T5(cfg).apply({"params": params}, encoder_BxS, method=T5.encode)
    mask_BxS = encoder_BxS > 0
    module = T5(cfg, decode=True)
    cache = _zero_cache(lambda: module.init(
        jax.random.key(0), jnp.zeros((b, cache_len), jnp.int32), encoded_BxSxD, mask_BxS,
        method=T5.decode_logits))
    logits, mutated = module.apply(
        {"params": params, "cache": cache}, jnp.zeros((b, 1), jnp.int32), encoded_BxSxD,
        mask_BxS, method=T5.decode_logits, mutable=["cache"])
    return logits[:, -1], mutated["cache"], mask_BxS


# ------------------------------------------------------------------------------------- both
def transposed_embedding(cfg: ModelConfig, params):
    """A tied float embedding's transposed copy [D, V] as `embedding_transposed` beside the
    table, which `Embed.attend` reads for the logits instead (the lookup keeps the table):
    XLA:CPU reads a [D, V] head faster than a [V, D] one (a loop of [1, 512] x [512, 32128]
    head products alone, best of 3 rounds: 1.31 against 1.68 ms). Other params (an untied head
    is [D, V] already), an int8 table, and params that have the copy already are passed as
    they are."""
    table = params["token_embedder"]["embedding"]
    if (not cfg.tie_embeddings or not isinstance(table, (jax.Array, np.ndarray))
            or "embedding_transposed" in params["token_embedder"]):
        return params
    return {**params, "token_embedder": {**params["token_embedder"],
                                         "embedding_transposed": table.T}}


def _fuse_kernels(params, parent: str, names: tuple, ndim: int, fused: str,
                  grouped: str | None = None):
    """In every `parent` dict that holds float kernels `names` (each `ndim` dims after any
    scanned layer dim), those kernels stacked as one `fused` kernel along a new dim after the
    input dim; kernels of different widths (grouped-query k / v) are concatenated along that
    dim instead, as `grouped`. Int8 kernels are left as they are."""
    def walk(tree, name=None):
        out = {k: walk(v, k) if isinstance(v, dict) else v for k, v in tree.items()}
        parts = [out.get(n) for n in names]
        if name == parent and all(isinstance(w, (jax.Array, np.ndarray)) for w in parts):
            lead = parts[0].ndim - ndim  # a scanned stack's layer dim
            if len({w.shape for w in parts}) == 1:
                out[fused] = jnp.stack(parts, axis=lead + 1)
            else:
                out[grouped] = jnp.concatenate(parts, axis=lead + 1)
            for n in names:
                del out[n]
        return out

    return walk(params)


def fuse_qkv(params):
    """Each self-attention's query, key and value kernels [D, H, K] as one `qkv` [D, 3, H, K]
    (`layers.Attention` reads it instead): one matmul per step instead of three. Under
    grouped-query attention (k / v [D, Hkv, K]) they are one `qkv_grouped` [D, H + 2 Hkv, K].
    (That layout would also do for H = Hkv, but stacked was 2-3% faster per step at batch 1:
    GPT-36M, three alternating process pairs, best of 3 x 5 runs each.)"""
    return _fuse_kernels(params, "self_attention", ("query", "key", "value"), 3, "qkv",
                         "qkv_grouped")


def fuse_gated_mlp(params):
    """Each gated MLP's input kernels wi_0, wi_1 [D, F] as one `wi_fused` [D, 2, F]
    (`layers.Mlp` reads it instead): one matmul per step instead of two."""
    return _fuse_kernels(params, "mlp", ("wi_0", "wi_1"), 2, "wi_fused")


def cpu_weights(cfg: ModelConfig, params):
    """The decode weight layout on CPU, for any number of rows per step.

    Kernels stay as they are stored, [in, out], and the head is one [D, V] kernel (a tied
    embedding gets a transposed copy: `transposed_embedding`). One row per step makes every
    projection a matrix-vector product, which XLA:CPU emits as its own tiled loop; that loop
    streams an [in, out] kernel faster than an [out, in] one (GPT-36M batch 1 on a 2-core Xeon:
    8.2 -> 6.3 ms per token), and with jax 0.10 one [D, V] head faster than the two [V / 2, D]
    row blocks that earlier versions read from both cores (2-core EPYC, 128 new tokens,
    alternating rounds of 3 runs, ms per token best of 3, blocks -> one: GPT-36M 5.04-5.38 ->
    4.76-5.05, T5 ~70M 5.61-5.69 -> 5.25-5.41). From two rows on the matmuls go to the library
    (YNNPACK), where with jax 0.10 [in, out] is faster too (128 new tokens, alternating runs,
    best of 2 each, three rounds; ms per token, [out, in] in one block -> [in, out]: GPT-36M
    batch 16 17.6-17.9 -> 14.8-15.7, batch 4 11.7-12.4 -> 8.8-9.7, batch 2 10.1-11.1 ->
    7.9-8.7; T5 ~70M batch 16 17.3-17.5 -> 14.8-15.4; two blocks were no better than one), and
    so is one [D, V] head against two [V / 2, D] blocks (GPT-36M batch 16 18.5-19.8 ->
    17.8-18.2, T5 18.8-19.4 -> 17.3-17.6). Self-attention's three input projections are fused
    into one (`fuse_qkv`), and so are a gated MLP's two (`fuse_gated_mlp`): a small matmul
    costs a fixed ~30-60 us on top of its bytes here, so one [512, 3*512] beats three
    [512, 512] (GPT-36M batch 1: 6.5 -> 6.1 ms per token, A/B min of 3) and one [512, 2*1024]
    two [512, 1024] (T5 ~70M batch 1: 7.47 -> 6.18 ms); batch 16 equal.
    """
    return transposed_embedding(cfg, fuse_gated_mlp(fuse_qkv(params)))


def unrolled(cfg: ModelConfig, params):
    """(cfg, params) of a scan_layers model as an unrolled one, its layers sliced off the
    stacked params before the loop (on CPU once per loaded model: `generate.decode_weights`).

    A scanned stack keeps its KV caches stacked too, and the layer scan reads them as inputs
    and writes them as new outputs, so every decode step copies the whole cache: GPT-36M at
    batch 16 (a 144-slot cache), 101 ms per token scanned against 38 unrolled on a busy hour of
    the 2-core CPU. Unrolled, each layer's cache is its own buffer of the loop state, updated in
    place; the price is compiling each layer's step separately.
    """
    if not cfg.scan_layers:
        return cfg, params
    return unrolled_config(cfg), unstack_layers(params)


def unrolled_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with unrolled layers (the config `unrolled` returns)."""
    return dataclasses.replace(cfg, scan_layers=False) if cfg.scan_layers else cfg


def decode_layout(cfg: ModelConfig, params):
    """(cfg, params) as the decode programs read them: a scanned stack unrolled (`unrolled`)
    and, on CPU, the decode weight layout (`cpu_weights`). Idempotent: given its own output it
    returns it unchanged, so weights laid out once (`generate.decode_weights`) go through
    `prefill` without another copy."""
    cfg, params = unrolled(cfg, params)
    if jax.default_backend() == "cpu":
        params = cpu_weights(cfg, params)
    return cfg, params


def prefill(cfg: ModelConfig, params, prompt_BxP, lengths_B, cache_len: int, rows_R=None,
            prefix_lm: bool = False):
    """Family-independent prefill; `rows_R` repeats/reorders rows after it (beams, samples);
    `prefix_lm`: a GPT trained with objective prefix_lm, whose prompt is its prefix
    (`gpt_prefill`).

    The params take the decode layout (`decode_layout`) unless they have it already.

    Returns:
      (first logits [R, V], cache with R rows, `tokens_to_logits(ids, cache)` for R rows).
    """
    cfg, params = decode_layout(cfg, params)
    if cfg.family == "gpt":
        logits_BxV, cache, step = gpt_prefill(cfg, params, prompt_BxP, lengths_B, cache_len,
                                               prefix_lm)
        if rows_R is not None:
            logits_BxV, cache = logits_BxV[rows_R], cache_lib.take_rows(cache, rows_R)
        return logits_BxV, cache, step
    if cfg.family == "t5":
        logits_BxV, cache, mask_BxS = t5_prefill(cfg, params, prompt_BxP, cache_len)
        if rows_R is not None:
            logits_BxV, cache = logits_BxV[rows_R], cache_lib.take_rows(cache, rows_R)
            mask_BxS = mask_BxS[rows_R]
        return logits_BxV, cache, t5_step_fn(cfg, params, mask_BxS)
    raise ValueError(f"Decoding needs a 't5' or 'gpt' model, not family {cfg.family!r}")
