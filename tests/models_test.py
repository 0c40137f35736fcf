"""Model core: causality, masks, packing, precision, scan/remat equivalence, every preset builds."""
import dataclasses
import glob
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import config as mc
from t5x_lite.models import abstract_variables, build_model

SMALL = dict(vocab_size=96, d_model=24, num_heads=3, head_dim=10, d_ff=40, num_layers=2)
FAMILY_CONFIGS = {
    "t5_1_0": mc.t5_1_0(**SMALL, num_decoder_layers=3, relative_buckets=8, relative_max_distance=12),
    "t5_1_1": mc.t5_1_1(**SMALL),
    "gpt2": mc.gpt2(**SMALL, max_len=32),
    "gpt_modern": mc.gpt_modern(**SMALL),
    "bert": mc.bert(**SMALL, max_len=32),
}


def init_params(cfg, seed=0):
    return nn.meta.unbox(build_model(cfg).init(jax.random.key(seed)))["params"]


def random_tokens(rng, shape, vocab=96, low=3):
    return jnp.asarray(rng.integers(low, vocab, size=shape), jnp.int32)


@pytest.mark.parametrize("name", ["t5_1_1", "gpt2", "gpt_modern"])
def test_future_tokens_get_zero_gradient(name):
    """Causality: d logits[t] / d embedding(token[t']) == 0 for t' > t in the decoder."""
    cfg = FAMILY_CONFIGS[name]
    model = build_model(cfg)
    params = init_params(cfg)
    rng = np.random.default_rng(0)
    t, probe = 12, 4  # 12 = 4 causal blocks of 3: the block-skipping path is the one tested
    assert cfg.causal_blocks == 4
    batch = {"decoder_input_tokens": random_tokens(rng, (1, t))}
    if cfg.family == "t5":
        batch["encoder_input_tokens"] = random_tokens(rng, (1, 7))
    emb = params["token_embedder"]["embedding"]

    def out_at_probe(delta):
        # Add a perturbation to every decoder input embedding by editing the table per position:
        # equivalently, perturb the embedding rows through a one-hot trick on the tokens used.
        p = jax.tree.map(lambda x: x, params)
        p["token_embedder"]["embedding"] = emb
        module = model.module()

        def embed_hook(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, nn.Module) \
                    and context.module.name == "token_embedder" and out.shape[1] == t:
                out = out + delta.astype(out.dtype)
            return out

        with nn.intercept_methods(embed_hook):
            logits = module.apply({"params": p}, **batch)
        return logits[0, probe].sum()

    grad = jax.jit(jax.grad(out_at_probe))(jnp.zeros((1, t, cfg.d_model)))
    per_position = np.abs(np.asarray(grad)).sum(-1)[0]
    assert np.all(per_position[probe + 1:] == 0), per_position
    assert np.all(per_position[: probe + 1] > 0), per_position


def test_encoder_is_bidirectional_and_ignores_padding():
    cfg = FAMILY_CONFIGS["t5_1_1"]
    model = build_model(cfg)
    logits = jax.jit(model.logits)  # one compile per shape, not one per op
    params = init_params(cfg)
    rng = np.random.default_rng(1)
    enc = np.asarray(random_tokens(rng, (1, 8)))
    dec = random_tokens(rng, (1, 5))
    base = logits(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
    # Appending padding must not change anything; changing the last real token must.
    padded = np.concatenate([enc, np.zeros((1, 4), np.int32)], axis=1)
    with_pad = logits(params, {"encoder_input_tokens": padded, "decoder_input_tokens": dec})
    np.testing.assert_allclose(base, with_pad, atol=1e-5)
    changed = enc.copy()
    changed[0, -1] = (changed[0, -1] + 1) % 90 + 3
    other = logits(params, {"encoder_input_tokens": changed, "decoder_input_tokens": dec})
    assert np.abs(np.asarray(other) - np.asarray(base)).max() > 1e-4


def _pack(seqs, length):
    tokens = np.zeros((1, length), np.int32)
    seg = np.zeros((1, length), np.int32)
    pos = np.zeros((1, length), np.int32)
    i = 0
    for s_id, s in enumerate(seqs, start=1):
        tokens[0, i:i + len(s)] = s
        seg[0, i:i + len(s)] = s_id
        pos[0, i:i + len(s)] = np.arange(len(s))
        i += len(s)
    return tokens, seg, pos


@pytest.mark.parametrize("name", ["gpt2", "gpt_modern", "t5_1_0", "bert"])
def test_packed_forward_equals_unpacked_per_segment(name):
    cfg = FAMILY_CONFIGS[name]
    model = build_model(cfg)
    logits = jax.jit(model.logits)  # one compile per shape, not one per op
    params = init_params(cfg)
    rng = np.random.default_rng(2)
    lengths, dec_lengths = [5, 7, 3], [4, 2, 6]
    seqs = [np.asarray(random_tokens(rng, (n,))) for n in lengths]
    dec_seqs = [np.asarray(random_tokens(rng, (n,))) for n in dec_lengths]
    tok, seg, pos = _pack(seqs, 18)
    if cfg.family == "gpt":
        packed = logits(params, {"decoder_input_tokens": tok, "decoder_segment_ids": seg,
                                 "decoder_positions": pos})
        for s_id, s in enumerate(seqs, start=1):
            alone = logits(params, {"decoder_input_tokens": s[None]})
            np.testing.assert_allclose(packed[0][seg[0] == s_id], alone[0], atol=2e-5)
    elif cfg.family == "bert":
        packed = logits(params, {"encoder_input_tokens": tok, "encoder_segment_ids": seg,
                                 "encoder_positions": pos})
        for s_id, s in enumerate(seqs, start=1):
            alone = logits(params, {"encoder_input_tokens": s[None]})
            np.testing.assert_allclose(packed[0][seg[0] == s_id], alone[0], atol=2e-5)
    else:
        dtok, dseg, dpos = _pack(dec_seqs, 14)
        packed = logits(params, {
            "encoder_input_tokens": tok, "encoder_segment_ids": seg, "encoder_positions": pos,
            "decoder_input_tokens": dtok, "decoder_segment_ids": dseg, "decoder_positions": dpos})
        for s_id, (s, d) in enumerate(zip(seqs, dec_seqs), start=1):
            alone = logits(params, {"encoder_input_tokens": s[None],
                                    "decoder_input_tokens": d[None]})
            np.testing.assert_allclose(packed[0][dseg[0] == s_id], alone[0], atol=2e-5)


def test_prefix_lm_attends_bidirectionally_within_prefix_only():
    cfg = FAMILY_CONFIGS["gpt_modern"]
    model = build_model(cfg)
    params = init_params(cfg)
    rng = np.random.default_rng(3)
    tok = np.asarray(random_tokens(rng, (1, 8)))
    prefix = np.array([[1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
    base = model.logits(params, {"decoder_input_tokens": tok, "decoder_causal_attention": prefix})
    changed = tok.copy()
    changed[0, 2] = (changed[0, 2] + 1) % 90 + 3  # last prefix token: visible to position 0
    other = model.logits(params, {"decoder_input_tokens": changed, "decoder_causal_attention": prefix})
    diff = np.abs(np.asarray(other) - np.asarray(base)).max(-1)[0]
    assert diff[0] > 1e-5 and diff[1] > 1e-5
    changed = tok.copy()
    changed[0, 5] = (changed[0, 5] + 1) % 90 + 3  # a suffix token: causal as usual
    other = model.logits(params, {"decoder_input_tokens": changed, "decoder_causal_attention": prefix})
    diff = np.abs(np.asarray(other) - np.asarray(base)).max(-1)[0]
    assert np.all(diff[:5] == 0) and diff[5] > 1e-5


@pytest.mark.parametrize("name", ["t5_1_1", "gpt_modern"])
def test_scan_and_remat_match_unrolled(name):
    cfg = FAMILY_CONFIGS[name]
    model = build_model(cfg)
    params = init_params(cfg)
    rng = np.random.default_rng(4)
    batch = {"decoder_input_tokens": random_tokens(rng, (2, 6)),
             "decoder_target_tokens": random_tokens(rng, (2, 6))}
    if cfg.family == "t5":
        batch["encoder_input_tokens"] = random_tokens(rng, (2, 9))
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]))
    ref_loss, ref_grad = loss_and_grad(params)
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True, remat="full")
    scanned = build_model(scanned_cfg)

    def stack(layers_parent):
        names = sorted((k for k in layers_parent if k.startswith("layers_")),
                       key=lambda k: int(k.split("_")[1]))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers_parent[k] for k in names])
        rest = {k: v for k, v in layers_parent.items() if not k.startswith("layers_")}
        return {**rest, "layers": {"block": stacked}}

    sp = {k: (stack(v) if k in ("encoder", "decoder") else v) for k, v in params.items()}
    assert jax.tree.map(jnp.shape, sp) == jax.tree.map(
        jnp.shape, nn.meta.unbox(abstract_variables(scanned))["params"])
    loss, grad = jax.jit(jax.value_and_grad(lambda p: scanned.loss_fn(p, batch)[0]))(sp)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    sg = {k: (stack(v) if k in ("encoder", "decoder") else v) for k, v in ref_grad.items()}
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(sg)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["t5_1_1", "gpt2", "gpt_modern"])
def test_causal_blocks_equal_the_full_square(name):
    """Skipping the masked triangle changes no number: loss and every gradient, with packed
    segments and padding (T5: in the decoder; the encoder is bidirectional), for block counts
    that divide the length (3 and 4: blocks of 4 and 3 tokens, whose edges cut every packed
    segment but the last); the full square is computed once per family."""
    cfg = dataclasses.replace(FAMILY_CONFIGS[name], causal_blocks=1)
    params = init_params(cfg)
    rng = np.random.default_rng(5)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 2 + [0], [1] * 12], jnp.int32)
    batch = {"decoder_input_tokens": random_tokens(rng, (2, 12)),
             "decoder_target_tokens": random_tokens(rng, (2, 12)),
             "decoder_loss_weights": (seg > 0).astype(jnp.float32),
             "decoder_segment_ids": seg,
             "decoder_positions": jnp.asarray([list(range(5)) + list(range(4)) + [0, 1, 0],
                                               list(range(12))], jnp.int32)}
    if cfg.family == "t5":
        batch["encoder_input_tokens"] = random_tokens(rng, (2, 7))
    grads, dots = {}, {}
    for n in (1, 3, 4):
        model = build_model(dataclasses.replace(cfg, causal_blocks=n))
        grads[n] = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]))(params)
        dots[n] = str(jax.make_jaxpr(lambda p: model.loss_fn(p, batch)[0])(params)).count(
            "dot_general")
    for blocks in (3, 4):
        # Each causal self-attention's 2 matmuls became 2 per block (the path under test ran).
        assert dots[blocks] - dots[1] == 2 * (blocks - 1) * cfg.decoder_layers, (blocks, dots)
        np.testing.assert_allclose(grads[blocks][0], grads[1][0], rtol=1e-5, err_msg=blocks)
        for a, b in zip(jax.tree.leaves(grads[blocks][1]), jax.tree.leaves(grads[1][1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{blocks} blocks")


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(FAMILY_CONFIGS["t5_1_1"], dtype="bfloat16")
    model = build_model(cfg)
    params = init_params(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    rng = np.random.default_rng(5)
    batch = {"encoder_input_tokens": random_tokens(rng, (2, 9)),
             "decoder_input_tokens": random_tokens(rng, (2, 6))}
    logits = jax.jit(model.logits)(params, batch)
    assert logits.dtype == jnp.float32
    ref = jax.jit(build_model(dataclasses.replace(cfg, dtype="float32")).logits)(params, batch)
    # bf16 keeps ~3 significant digits per op; a few layers stay within a few % of the scale.
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.08 * np.abs(np.asarray(ref)).max()
    jaxpr = str(jax.make_jaxpr(lambda p: model.logits(p, batch))(params))
    assert "bf16" in jaxpr


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dot_product_attention_impl_keeps_padding_rows_finite(dtype):
    """jax.nn.dot_product_attention takes the bias in the compute dtype: float16 turned the
    -1e10 mask into -inf, and an all-padding row (a padded eval batch) into NaN logits, which
    made the batch's loss NaN though its weights are 0. The xla impl's loss is the reference."""
    batch = {"encoder_input_tokens": np.array([[5, 6, 7, 1], [0, 0, 0, 0]], np.int32),
             "decoder_input_tokens": np.array([[0, 8, 9], [0, 0, 0]], np.int32),
             "decoder_target_tokens": np.array([[8, 9, 1], [0, 0, 0]], np.int32)}
    batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] > 0).astype(np.float32)
    cfg = dataclasses.replace(FAMILY_CONFIGS["t5_1_1"], dtype=dtype)
    params = init_params(cfg)
    losses = {}
    for impl in ("xla", "dot_product_attention"):
        model = build_model(dataclasses.replace(cfg, attention_impl=impl))
        # op by op: XLA:CPU compiles no float16 x float16 -> float32 dot (jax.nn's attention)
        assert np.isfinite(np.asarray(model.logits(params, batch))).all(), impl
        losses[impl] = float(model.loss_fn(params, batch)[0])
    np.testing.assert_allclose(losses["dot_product_attention"], losses["xla"], rtol=0.02)


def test_label_smoothing_and_z_loss_follow_the_formulas():
    from t5x_lite.losses import cross_entropy_sums
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 3))
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    out = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                             z_loss=1e-2, label_smoothing=0.1)
    # Independent numpy computation of T5X's smoothed cross entropy + z-loss.
    log_z = np.log(np.exp(logits).sum(-1))
    logp = logits - log_z[..., None]
    soft = np.full(logits.shape, 0.1 / 6)
    np.put_along_axis(soft, targets[..., None], 0.9, axis=-1)
    const = -(0.9 * np.log(0.9) + 6 * (0.1 / 6) * np.log(0.1 / 6))
    per_tok = -(soft * logp).sum(-1) - const + 1e-2 * log_z ** 2
    np.testing.assert_allclose(out["loss_sum"], (per_tok * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(out["weight_sum"], 3.0)
    correct = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(out["correct_sum"], correct.sum())


def test_config_differences_ignore_only_dtype_dropout_and_remat():
    """What a LoRA base check and evaluating another run's checkpoint compare."""
    a = mc.t5_1_1(num_layers=2)
    b = dataclasses.replace(a, dtype="bfloat16", dropout_rate=0.1, remat="full")
    assert a.differences(b) == []
    c = dataclasses.replace(a, d_ff=96, scale_logits=True)
    assert a.differences(c) == [f"d_ff: {a.d_ff!r} vs 96", "scale_logits: False vs True"]


def test_bad_model_configs_fail_with_clear_messages():
    with pytest.raises(mc.ConfigError, match="mlp must be one of"):
        mc.t5_1_1(mlp="gelu2")
    with pytest.raises(mc.ConfigError, match="Unknown model config keys"):
        mc.ModelConfig.from_dict({"family": "t5", "d_modle": 3})
    with pytest.raises(mc.ConfigError, match="rope needs an even head_dim"):
        mc.gpt_modern(head_dim=7)


CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_builds_abstractly(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_config = module.get_config()
    cfg = mc.ModelConfig.from_dict(run_config.model)
    variables = abstract_variables(build_model(cfg))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(variables)))
    assert n > 0
    for key in ("seed", "train.num_steps", "train.batch_size", "train.log_every",
                "checkpoint.save_every", "checkpoint.keep", "mesh.data", "mesh.fsdp",
                "mesh.tensor", "model.dtype"):
        node = run_config
        for part in key.split("."):
            node = node[part]


@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (1e-2, 0.0), (1e-2, 0.1)])
def test_cross_entropy_custom_gradient_equals_autodiff_of_the_formula(z_loss, label_smoothing):
    from t5x_lite.losses import cross_entropy_sums
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 5)))
    weights = jnp.asarray(rng.random((2, 5)), jnp.float32)
    v = logits.shape[-1]

    def reference(lg):  # plain autodiff through log_softmax and the smoothed targets
        log_z = jax.nn.logsumexp(lg, -1)
        onehot = jax.nn.one_hot(targets, v)
        low = label_smoothing / (v - 1)
        q = onehot * (1 - label_smoothing) + (1 - onehot) * low
        const = 0.0 if not label_smoothing else -(
            (1 - label_smoothing) * np.log(1 - label_smoothing) + label_smoothing * np.log(low))
        z = z_loss * log_z ** 2
        per_token = -(q * (lg - log_z[..., None])).sum(-1) - const + z
        return (per_token * weights).sum() + 3.0 * (z * weights).sum()

    def ours(lg):
        sums = cross_entropy_sums(lg, targets, weights, z_loss=z_loss,
                                  label_smoothing=label_smoothing)
        return sums["loss_sum"] + 3.0 * sums["z_loss_sum"]

    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-6)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16"])
def test_cross_entropy_gradient_is_the_same_for_narrow_integer_targets(dtype):
    """Targets of any integer dtype, in a vocabulary wider than that dtype's range: the
    gradient is softmax - one_hot(target), with one target id per row (no wrapped ids)."""
    from t5x_lite.losses import cross_entropy_sums
    rng = np.random.default_rng(3)
    v = 40000 if dtype == "int16" else 300
    logits = jnp.asarray(rng.normal(size=(2, 3, v)), jnp.float32)
    targets = rng.integers(0, 100, size=(2, 3))
    weights = jnp.ones((2, 3), jnp.float32)
    grad = jax.grad(lambda lg: cross_entropy_sums(
        lg, jnp.asarray(targets, dtype), weights)["loss_sum"])(logits)
    expected = jax.nn.softmax(logits, -1) - jax.nn.one_hot(targets, v)
    np.testing.assert_allclose(grad, expected, atol=1e-6)
