"""Pre-norm transformer blocks, layer stacks (unrolled or scanned, optional remat) and masks.

Shape legend: B batch, T query length, S key length, L cache length, D d_model.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite.config import ModelConfig
from t5x_lite.layers import Attention, Mlp, Norm, constrain, make_dropout

REMAT_POLICY = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def make_norm(cfg: ModelConfig, name: str | None = None) -> Norm:
    return Norm(cfg.norm, cfg.norm_eps, cfg.compute_dtype, name=name)


class Block(nn.Module):
    """x + Attn(Norm(x)) [+ CrossAttn(Norm(x))] + Mlp(Norm(x)), with dropout on each branch."""

    config: ModelConfig
    cross: bool = False
    decode: bool = False
    deterministic: bool = True
    causal: bool = False  # self-attention's bias is causal (see layers.dot_product_attention)

    @nn.compact
    def __call__(self, x_BxTxD, bias, encoded_BxSxD, cross_bias, positions_BxT, decode_index):
        cfg = self.config
        drop = lambda y: make_dropout(cfg)(y, deterministic=self.deterministic)
        h = make_norm(cfg, "pre_attention_norm")(x_BxTxD)
        h = Attention(cfg, causal=self.causal, name="self_attention")(
            h, h, bias, positions_q=positions_BxT, positions_kv=positions_BxT, decode=self.decode,
            decode_index=decode_index, deterministic=self.deterministic)
        x_BxTxD = x_BxTxD + drop(h)
        if self.cross:
            h = make_norm(cfg, "pre_cross_attention_norm")(x_BxTxD)
            h = Attention(cfg, is_cross=True, name="cross_attention")(
                h, encoded_BxSxD, cross_bias, decode=self.decode, deterministic=self.deterministic)
            x_BxTxD = x_BxTxD + drop(h)
        h = make_norm(cfg, "pre_mlp_norm")(x_BxTxD)
        x_BxTxD = x_BxTxD + drop(Mlp(cfg, name="mlp")(h, deterministic=self.deterministic))
        return constrain(x_BxTxD, ("batch", "length", "embed"))


def _block_class(cfg: ModelConfig, scanned: bool):
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICY[cfg.remat], prevent_cse=not scanned)


class _ScanBody(nn.Module):
    """Adapts Block to nn.scan's (carry, ...) -> (carry, out) signature."""

    config: ModelConfig
    cross: bool = False
    decode: bool = False
    deterministic: bool = True
    causal: bool = False

    @nn.compact
    def __call__(self, x, *args):
        block = _block_class(self.config, scanned=True)(
            self.config, self.cross, self.decode, self.deterministic, self.causal, name="block")
        return block(x, *args), None


class Stack(nn.Module):
    """`num_layers` blocks, as `layers_0..n-1` or, with scan_layers, one `layers` scan."""

    config: ModelConfig
    num_layers: int
    cross: bool = False
    decode: bool = False
    deterministic: bool = True
    causal: bool = False

    @nn.compact
    def __call__(self, x, bias, encoded=None, cross_bias=None, positions=None, decode_index=None):
        cfg = self.config
        args = (bias, encoded, cross_bias, positions, decode_index)
        if cfg.scan_layers:
            scan = nn.scan(
                _ScanBody, variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * len(args),
                length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scan(cfg, self.cross, self.decode, self.deterministic, self.causal,
                        name="layers")(x, *args)
            return x
        block_cls = _block_class(cfg, scanned=False)
        for i in range(self.num_layers):
            x = block_cls(cfg, self.cross, self.decode, self.deterministic, self.causal,
                          name=f"layers_{i}")(x, *args)
        return x


_STACKS = ("encoder", "decoder")


def in_scanned_stack(path) -> bool:
    """Whether a key path (params, optimizer state, decode cache) lies in a scanned stack
    (`<stack>/layers/...`, the leading axis its layers), not an unrolled one (`layers_i`)."""
    return "layers" in (getattr(k, "key", getattr(k, "name", None)) for k in path)


def stack_layers(params: dict) -> dict:
    """Params of unrolled stacks (`<stack>/layers_i/...`) in the scan_layers layout
    (`<stack>/layers/block/...`, a leading layer axis); numpy."""
    out = dict(params)
    for stack in (s for s in _STACKS if s in params):
        layers = [params[stack][f"layers_{i}"] for i in range(len(params[stack]))]
        out[stack] = {"layers": {"block": jax.tree.map(lambda *xs: np.stack(xs), *layers)}}
    return out


def unstack_layers(params) -> dict:
    """Inverse of `stack_layers`, for numpy or jax arrays (traceable: slices of the layer axis;
    int8 weight boxes slice their value and scale)."""
    out = dict(params)
    for stack in (s for s in _STACKS if s in params):
        block = params[stack]["layers"]["block"]
        out[stack] = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], block)
                      for i in range(jax.tree.leaves(block)[0].shape[0])}
    return out


class DecodeCursor(nn.Module):
    """Cache bookkeeping for decode mode: the next slot and which cached slots hold real tokens.

    Each call writes `token_valid` [B, T] for the new chunk at slots [index, index+T) and returns
    the mask [B, T, L] (causal by slot, and only valid keys), the query slots [T] and the index
    the chunk was written at. `prefix_BxT` (a prefix-LM model's prompt chunk): flagged queries
    also see the chunk's later flagged keys (`prefix_lm_mask`). `window` (sliding-window
    attention): no query sees a key `window` or more slots before it. On the shape-defining init
    call (cache not created yet) the chunk length is the cache length L.
    """

    window: int | None = None

    @nn.compact
    def __call__(self, token_valid_BxT, prefix_BxT=None):
        b, t = token_valid_BxT.shape
        initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        valid = self.variable("cache", "key_valid", jnp.zeros, (b, t), jnp.bool_)
        if not initialized:
            q_slots_T = jnp.arange(t)
            mask_BxTxT = causal_mask(t)[None] & token_valid_BxT[:, None, :]
            return self._windowed(mask_BxTxT, q_slots_T, q_slots_T), q_slots_T, jnp.int32(0)
        start = index.value
        valid.value = jax.lax.dynamic_update_slice(valid.value, token_valid_BxT.astype(jnp.bool_),
                                                   (0, start))
        q_slots_T = start + jnp.arange(t)
        k_slots_L = jnp.arange(valid.value.shape[1])
        mask_BxTxL = (k_slots_L[None, :] <= q_slots_T[:, None])[None] & valid.value[:, None, :]
        if prefix_BxT is not None:
            prefix_BxT = prefix_BxT.astype(jnp.bool_)
            prefix_BxL = jax.lax.dynamic_update_slice(jnp.zeros(valid.value.shape, jnp.bool_),
                                                      prefix_BxT, (0, start))
            mask_BxTxL = mask_BxTxL | (prefix_BxT[:, :, None] & prefix_BxL[:, None, :])
        index.value = start + t
        return self._windowed(mask_BxTxL, q_slots_T, k_slots_L), q_slots_T, start

    def _windowed(self, mask_BxTxL, q_slots_T, k_slots_L):
        if self.window is None:
            return mask_BxTxL
        return mask_BxTxL & window_mask(q_slots_T, k_slots_L, self.window)[None]


def causal_mask(t: int):
    return jnp.tril(jnp.ones((t, t), jnp.bool_))


def window_mask(q_T, k_S, window: int):
    """[T, S]: key slot (or position) k within the `window` - 1 before query q, or after it
    (sliding-window attention: `k > q - window`, HF's; combined with a causal or prefix mask)."""
    return k_S[None, :] > q_T[:, None] - window


def segment_mask(seg_q_BxT, seg_k_BxS):
    return seg_q_BxT[:, :, None] == seg_k_BxS[:, None, :]


def prefix_lm_mask(causal_attention_BxT):
    """T5X prefix LM: positions flagged in `decoder_causal_attention` see each other fully."""
    c = causal_attention_BxT.astype(jnp.bool_)
    return c[:, :, None] & c[:, None, :]
