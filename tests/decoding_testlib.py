"""Shared helpers for the decoding tests: fast random params and a `loaded`-like object.

`model.init` compiles slowly on CPU (~10 s even for tiny models), so the decoding tests draw
params with numpy from the abstract shapes instead.
"""
import math
import types

import flax.linen as nn
import jax
import numpy as np

from t5x_lite import partitioning
from t5x_lite.models import abstract_variables, build_model


def random_params(cfg, seed: int = 0, embed_std: float = 0.5):
    """float32 numpy params shaped like `build_model(cfg)`'s; kernels ~ N(0, 1/fan_in)."""
    abstract = nn.meta.unbox(abstract_variables(build_model(cfg)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [p.key for p in path]
        shape = leaf.shape
        core = shape[1:] if "layers" in keys else shape  # scanned: leading layer axis
        if keys[-1] == "scale":
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif keys[-1].endswith("bias"):
            x = 0.1 * rng.standard_normal(shape)
        elif keys[-1] in ("embedding", "rel_embedding"):
            x = embed_std * rng.standard_normal(shape)
        else:
            x = rng.standard_normal(shape) / np.sqrt(core[0])
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def loaded(cfg, params=None, seed: int = 0, vocab=None, run_config=None):
    """What `t5x_lite.load` returns, as far as decoding needs it."""
    params = random_params(cfg, seed) if params is None else params
    return types.SimpleNamespace(model=build_model(cfg), params=params, vocab=vocab,
                                 run_config=run_config, config=cfg)


def on_mesh(loaded_model, shape):
    """`loaded_model` with its params sharded on a (data, fsdp, tensor) mesh of the first
    prod(shape) devices by the default rules, as `t5x_lite.load(path, mesh=...)` places them."""
    mesh = partitioning.make_mesh(*shape, devices=jax.devices()[:math.prod(shape)])
    boxed = abstract_variables(loaded_model.model)["params"]
    params = jax.device_put(loaded_model.params, partitioning.shardings(boxed, mesh))
    return types.SimpleNamespace(**{**vars(loaded_model), "params": params, "mesh": mesh,
                                    "rules": partitioning.DEFAULT_RULES})


class HashChain:
    """A synthetic LM whose next-token logits depend on the whole history through a hash
    state kept in the "cache": h' = (7 h + token) mod M, logits = table[h']. Cheap to compile,
    and a wrong cache reorder in beam search changes the scores."""

    def __init__(self, vocab: int, states: int = 13, seed: int = 0, scale: float = 2.0):
        self.table = (scale * np.random.default_rng(seed).standard_normal((states, vocab))
                      ).astype(np.float32)
        self.states = states

    def next_state(self, h, token):
        return (7 * h + token) % self.states

    def step(self, ids_BxT, cache):
        import jax.numpy as jnp
        h = cache["h"]
        logits = []
        for t in range(ids_BxT.shape[1]):
            h = self.next_state(h, ids_BxT[:, t])
            logits.append(jnp.asarray(self.table)[h])
        return jnp.stack(logits, 1), {"h": h}

    def log_probs(self, h):
        x = self.table[h].astype(np.float64)
        return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()

    def sequence_logprob(self, h0, tokens):
        total, h = 0.0, h0
        for t in tokens:
            total += self.log_probs(h)[t]
            h = self.next_state(h, t)
        return total


def assert_beams_score_their_log_probs(loaded_model, prompts, beams, atol=2e-4):
    """Each beam's score (decoder-only model) is the sum of its tokens' log-probs under the
    uncached forward pass of prompt + beam."""
    forward = jax.jit(loaded_model.model.logits)
    for prompt, result in zip(prompts, beams):
        for beam in result:
            ids = np.asarray([prompt + beam["ids"]], np.int32)
            logp = jax.nn.log_softmax(forward(loaded_model.params,
                                              {"decoder_input_tokens": ids})[0])
            p = len(prompt)
            want = sum(float(logp[p - 1 + i, t]) for i, t in enumerate(beam["ids"]))
            np.testing.assert_allclose(beam["score"], want, atol=atol)
