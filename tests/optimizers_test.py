"""Optimizers: T5 Adafactor defaults and schedule, AdamW warmup/decay, weight-decay mask, clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite.config import t5_1_1
from t5x_lite.defaults import base_config
from t5x_lite.training import optimizers


def _opt(**kw):
    c = base_config(t5_1_1(), objective="span_corruption").optimizer
    c.update(kw)
    return c


def test_rsqrt_schedule_is_t5_default():
    schedule = optimizers.make_schedule(_opt(), num_steps=100_000)
    for step, want in [(0, 0.01), (5000, 0.01), (10_000, 0.01), (40_000, 0.005)]:
        np.testing.assert_allclose(schedule(jnp.int32(step)), want, rtol=1e-6)


def test_adamw_warmup_then_cosine_and_linear():
    cos = optimizers.make_schedule(_opt(name="adamw", schedule="cosine", learning_rate=1.0,
                                        warmup_steps=10, end_lr_fraction=0.1), num_steps=110)
    np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    lin = optimizers.make_schedule(_opt(name="adamw", schedule="linear", learning_rate=1.0,
                                        warmup_steps=10, end_lr_fraction=0.0), num_steps=110)
    np.testing.assert_allclose([lin(10), lin(60), lin(110)], [1.0, 0.5, 0.0], atol=1e-6)


def test_decay_mask_skips_norms_biases_and_embeddings():
    params = {"token_embedder": {"embedding": 0}, "decoder_relpos": {"rel_embedding": 0},
              "decoder": {"layers": {"block": {  # scanned: matrices carry a layer axis
                  "pre_attention_norm": {"scale": 0, "bias": 0},
                  "self_attention": {"query": 0, "query_bias": 0},
                  "mlp": {"wi": 0, "wo_bias": 0}}}},
              "lm_head": 0}
    mask = optimizers.decay_mask(params)
    block = mask["decoder"]["layers"]["block"]
    assert block["self_attention"] == {"query": True, "query_bias": False}
    assert block["mlp"] == {"wi": True, "wo_bias": False}
    assert block["pre_attention_norm"] == {"scale": False, "bias": False}
    assert mask["lm_head"] and not mask["token_embedder"]["embedding"]
    assert not mask["decoder_relpos"]["rel_embedding"]
    assert optimizers.decay_mask(params, decay_embeddings=True)["token_embedder"]["embedding"]


def test_adamw_weight_decay_follows_mask():
    tx, _ = optimizers.make_optimizer(_opt(name="adamw", schedule="constant", learning_rate=0.1,
                                           weight_decay=0.5, grad_clip=0.0), 10)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


def test_adafactor_state_is_factored_without_momentum():
    tx, _ = optimizers.make_optimizer(_opt(), 10)
    state = tx.init({"w": jnp.ones((256, 128)), "b": jnp.ones((128,))})
    factored = state[0][0]  # chain(adafactor(...)): the factored second-moment state
    # optax: v_row drops the largest dim, v_col the second largest.
    assert factored.v_row["w"].shape == (128,) and factored.v_col["w"].shape == (256,)
    assert factored.v["w"].shape == (1,) and factored.v["b"].shape == (128,)
    leaves = jax.tree.leaves(state)
    # No first-moment (momentum) buffer: only the factored stats, placeholders and counters.
    assert sum(x.size for x in leaves) < 256 * 128


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adafactor_is_optax_adafactor_per_layer_of_a_scanned_stack(weight_decay):
    """Unscanned params: the updates (and state layout) of optax.adafactor with T5's settings.
    A scanned stack's leaf ([layers, ...] under "layers"): each layer's update is what that
    layer alone gets; optax took the update clipping and parameter-scale RMS over the whole
    stack, so a scanned model trained otherwise than the same model unscanned."""
    tx, schedule = optimizers.make_optimizer(_opt(weight_decay=weight_decay), 100)
    ref = optax.chain(optax.adafactor(
        learning_rate=schedule, decay_rate=0.8, clipping_threshold=1.0,
        multiply_by_parameter_scale=True, momentum=None, factored=True,
        min_dim_size_to_factor=128, weight_decay_rate=weight_decay or None,
        weight_decay_mask=optimizers.decay_mask if weight_decay else None))
    rng = np.random.default_rng(0)
    # layers of very different scales: a shared RMS would give both the same update size
    layers = [{"wi": jnp.asarray(rng.normal(size=(256, 130)) * s, jnp.float32),
               "norm": {"scale": jnp.asarray(rng.normal(size=(256,)) * s, jnp.float32)}}
              for s in (0.05, 1.0)]
    params = {"layers_0": layers[0], "layers_1": layers[1]}
    stacked = {"layers": {"block": jax.tree.map(lambda *x: jnp.stack(x), *layers)}}
    mine, theirs = tx.init(params), ref.init(params)
    assert jax.tree.structure(mine) == jax.tree.structure(theirs)
    scan_state = tx.init(stacked)
    for _ in range(3):
        grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, jnp.float32),
                              layer) for layer in layers]
        g = {"layers_0": grads[0], "layers_1": grads[1]}
        got, mine = tx.update(g, mine, params)
        want, theirs = ref.update(g, theirs, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                     got, want)
        g_stacked = {"layers": {"block": jax.tree.map(lambda *x: jnp.stack(x), *grads)}}
        per_layer, scan_state = tx.update(g_stacked, scan_state, stacked)
        for i in range(2):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-8),
                         per_layer["layers"]["block"], got[f"layers_{i}"])


def test_adafactor_says_when_it_factors_across_the_layer_axis(caplog):
    """optax factors a leaf's two largest dims when the smaller is >= 128: a scanned
    [layers, d] norm scale with 128 layers or more gets (layers,) and (d,) moments, which the
    same model unscanned never has (its per-layer updates up to 2x off)."""
    tx, _ = optimizers.make_optimizer(_opt(), 100)
    deep = {"layers": {"block": {
        "norm": {"scale": jnp.ones((128, 256))},  # factored across layers
        "narrow": {"scale": jnp.ones((128, 64))},  # 64 < 128: not factored at all
        "mlp": {"wi": jnp.ones((128, 256, 512))}}},  # 256 x 512 per layer, as unscanned
        "embed": jnp.ones((300, 200))}  # not scanned
    assert optimizers.factored_across_layers(deep) == ["['layers']['block']['norm']['scale']"]
    state = tx.init(deep)
    factored = [x.shape for x in jax.tree.leaves(state) if x.shape in ((128,), (256,))]
    assert factored  # what the warning is about: the layer axis has moments of its own
    assert ("Adafactor factors the second moments of 1 scanned params across the layer axis "
            "(['layers']['block']['norm']['scale'], ...)") in caplog.text
    caplog.clear()
    shallow = jax.tree.map(lambda x: x[:127] if x.shape[0] == 128 else x, deep)
    assert optimizers.factored_across_layers(shallow) == []
    tx.init(shallow)
    assert "layer axis" not in caplog.text


def test_adafactor_factors_attention_kernels_as_embed_by_heads_kv_matrices():
    """T5X's factor rules (embed a row; heads, kv columns): a query / key / value kernel
    [embed, heads, kv] and an out kernel [heads, kv, embed] get the updates optax.adafactor
    gives the [embed, heads * kv] / [heads * kv, embed] matrices, with factored (not full)
    second moments; optax alone factored no attention kernel (heads and kv are < 128)."""
    tx, schedule = optimizers.make_optimizer(_opt(), 100)
    ref = optax.chain(optax.adafactor(
        learning_rate=schedule, decay_rate=0.8, clipping_threshold=1.0,
        multiply_by_parameter_scale=True, momentum=None, factored=True,
        min_dim_size_to_factor=128))
    rng = np.random.default_rng(1)
    attn = {"query": jnp.asarray(rng.normal(size=(256, 4, 64)), jnp.float32),
            "out": jnp.asarray(rng.normal(size=(4, 64, 256)) * 0.3, jnp.float32)}
    as_matrices = {"query": attn["query"].reshape(256, 256), "out": attn["out"].reshape(256, 256)}
    state, ref_state = tx.init(attn), ref.init(as_matrices)
    assert sum(x.size for x in jax.tree.leaves(state)) < 256 * 256  # factored
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), attn)  # a scanned [layers, ...] leaf
    scan_state = tx.init({"layers": {"block": stacked}})
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32), attn)
        got, state = tx.update(g, state, attn)
        want, ref_state = ref.update(jax.tree.map(lambda x: x.reshape(256, 256), g), ref_state,
                                     as_matrices)
        for k in attn:
            np.testing.assert_allclose(got[k], want[k].reshape(attn[k].shape), rtol=1e-5,
                                       atol=1e-8)
        g2 = {"layers": {"block": jax.tree.map(lambda x: jnp.stack([x, x]), g)}}
        per_layer, scan_state = tx.update(g2, scan_state, {"layers": {"block": stacked}})
        for k in attn:  # layer 0 of the stack is the unscanned kernel
            np.testing.assert_allclose(per_layer["layers"]["block"][k][0], got[k], rtol=1e-5,
                                       atol=1e-8)


def test_global_norm_clipping():
    tx, _ = optimizers.make_optimizer(_opt(name="adamw", schedule="constant", learning_rate=1.0,
                                           grad_clip=1.0, weight_decay=0.0), 10)
    clip = optax.clip_by_global_norm(1.0)
    g = {"w": jnp.full((4,), 10.0)}
    clipped, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(optax.global_norm(clipped), 1.0, rtol=1e-6)
    assert isinstance(tx.init({"w": jnp.ones((4,))})[0], optax.EmptyState)


@pytest.mark.parametrize("name, clipped", [("adafactor", False), ("adamw", True)])
def test_default_clipping_is_off_for_adafactor_as_in_t5x_and_1_for_adamw(name, clipped):
    """T5X's Adafactor clips no gradient norm (its update clipping bounds each step): clipping
    in front of it rescaled each step's gradient differently, which changed its second-moment
    statistics whenever the norm passed 1."""
    opt = base_config(t5_1_1(), objective="span_corruption").optimizer
    opt.name, opt.schedule = name, ("rsqrt" if name == "adafactor" else "constant")
    assert opt.grad_clip is None
    explicit = opt.copy_and_resolve_references()
    explicit.grad_clip = 1.0 if clipped else 0.0
    params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,))}
    runs = []
    for o in (opt, explicit):
        tx, _ = optimizers.make_optimizer(o, 10)
        state, out = tx.init(params), []
        for scale in (8.0, 2.0, 30.0):  # global norms above 1
            g = jax.tree.map(lambda p: scale * jnp.sin(jnp.arange(p.size).reshape(p.shape) + 1.0),
                             params)
            update, state = tx.update(g, state, params)
            out.append(update)
        runs.append(out)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a["w"], b["w"])
    assert optimizers.grad_clip(opt) == explicit.grad_clip


@pytest.mark.parametrize("kw, match", [
    (dict(name="sgd"), "optimizer.name"),
    (dict(name="adamw", schedule="rsqrt"), "rsqrt"),
    (dict(name="adamw", schedule="exp"), "optimizer.schedule"),
])
def test_bad_settings_raise(kw, match):
    with pytest.raises(optimizers.OptimizerError, match=match):
        optimizers.make_optimizer(_opt(**kw), 10)


def test_constant_schedule_says_warmup_is_unused(caplog):
    schedule = optimizers.make_optimizer(_opt(schedule="constant", learning_rate=0.1,
                                              warmup_steps=500), 100)[1]
    assert float(schedule(0)) == pytest.approx(0.1)  # from step 0, no warmup
    assert "optimizer.warmup_steps=500 is unused: schedule='constant'" in caplog.text


def test_a_warmup_reaching_the_decay_end_says_so(caplog):
    """AdamW with the base config's warmup_steps=10000 on a 1000-step run stayed below 10% of
    its learning rate without a word."""
    optimizers.make_optimizer(_opt(name="adamw", schedule="cosine", learning_rate=1e-3), 1000)
    assert ("optimizer.warmup_steps=10000 reaches the cosine decay's end (step 1000, "
            "optimizer.decay_steps or train.num_steps): the learning rate only warms up; lower "
            "warmup_steps for a decay" in caplog.text)
    caplog.clear()
    optimizers.make_optimizer(_opt(name="adamw", schedule="linear", learning_rate=1e-3,
                                   warmup_steps=100, decay_steps=50), 1000)
    assert "the learning rate only warms up, then drops to its end value" in caplog.text
    caplog.clear()
    optimizers.make_optimizer(_opt(name="adamw", schedule="cosine", learning_rate=1e-3,
                                   warmup_steps=100), 1000)
    assert caplog.text == ""
