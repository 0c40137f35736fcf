"""Magnitude pruning: exact sparsity, whole heads / MLP units, masks that keep pruned weights at
zero through training, the polynomial schedule, and a pruning run through the trainer."""
import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decoding_testlib
from t5x_lite import checkpoints, compression, partitioning, pruning
from t5x_lite import config as model_config
from t5x_lite.models import build_model
from t5x_lite.training import testing, train, train_state, train_step

V, D, H, K, F = 128, 32, 4, 8, 64


def _t5(scan=False):
    return model_config.t5_1_1(vocab_size=V, d_model=D, num_heads=H, head_dim=K, d_ff=F,
                               num_layers=2, num_decoder_layers=1, dtype="float32",
                               scan_layers=scan)


def _init(cfg, seed=0):
    """(random params, logical axes): magnitude pruning needs values, not a trained init, and
    numpy values cost no model init / compile."""
    boxed = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0)))["params"]
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                          nn.meta.unbox(boxed))
    return params, compression.logical_axes(boxed)


def _zero_fraction(params, pattern=pruning.DEFAULT_TARGETS):
    leaves = compression.select(params, pattern).values()
    return sum(int(jnp.sum(x == 0)) for x in leaves) / sum(x.size for x in leaves)


def _stable_sort_keep(scores, sparsity):
    """The reference selection: a stable argsort of the ravelled concatenation (numpy)."""
    flat = np.concatenate([np.ravel(s) for s in scores])
    k = round(sparsity * flat.size)  # what the README promises, in float64
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    return np.split(keep, np.cumsum([np.size(s) for s in scores])[:-1])


@pytest.mark.parametrize("sparsity", [0.0, 0.013, 0.3, 0.5, 0.97, 1.0])
def test_selection_without_sort_equals_a_stable_sort(sparsity):
    # Several arrays ranked as one, with ties (a coarse grid of values), exact zeros, the -1.0
    # that marks already-pruned units, large and tiny magnitudes and +inf.
    rng = np.random.default_rng(int(sparsity * 1000))
    grid = lambda shape: np.round(rng.standard_normal(shape) * 4) / 4
    scores = [np.abs(grid((7, 9))).astype(np.float32),
              np.where(rng.random((40,)) < 0.2, -1.0, np.abs(grid((40,)))).astype(np.float32),
              np.concatenate([rng.random(20) * 1e-30, rng.random(20) * 1e30, [np.inf, 0.0]]
                             ).astype(np.float32).reshape(6, 7),
              np.abs(grid((4, 64))).astype(np.float32),  # counted in windows of 32
              np.abs(grid((2, 3, 32))).astype(np.float32)]  # a [D, H, K]-like kernel
    got = jax.jit(pruning._prune_smallest)([jnp.asarray(s) for s in scores], sparsity)
    for g, want, s in zip(got, _stable_sort_keep(scores, sparsity), scores):
        np.testing.assert_array_equal(np.asarray(g).ravel(), want)
        assert g.shape == s.shape
    # Per layer (scope='layer' on a scanned stack): vmapped over the leading dim.
    layered = np.abs(grid((3, 50))).astype(np.float32)
    got = jax.vmap(lambda s: pruning._prune_smallest([s], sparsity)[0])(jnp.asarray(layered))
    for row, s in zip(np.asarray(got), layered):
        np.testing.assert_array_equal(row, _stable_sort_keep([s], sparsity)[0])


def test_global_selection_holds_about_its_shard_of_the_scores_per_device():
    # Kernels sharded 8 ways (FSDP): the selection must not gather the scores onto one device
    # (a sort of their concatenation does: ~4 full copies per device).
    mesh = partitioning.make_mesh(data=1, fsdp=8, tensor=1)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
    scores = [jax.ShapeDtypeStruct((512, 1024), jnp.float32, sharding=spec)] * 4
    compiled = jax.jit(lambda s: pruning._prune_smallest(s, 0.5)).lower(scores).compile()
    shard_bytes = sum(s.size * 4 for s in scores) // 8
    assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * shard_bytes


@pytest.mark.parametrize("n", [2**24 + 1, 18_900_001, 925_000_001, 2**32 - 1])
def test_prune_count_is_exact_past_2_24_candidates(n):
    """round(s * n) (float64, half to even) also where float32 cannot hold s * n (x64 is off):
    0.7 of 18,900,001 is 13,230,001, float32 made it 13,230,000 (and 0.7 of 925,000,001 33
    short). Static sparsities are counted on the host; a traced one (the schedule inside the
    update) is exact where it equals an anchor and within n * 2**-23 + 1 in between."""
    sparsities = (0.0, 0.013, 0.3, 0.5, 0.7, 0.97, 1.0)
    want = np.array([round(s * n) for s in sparsities], np.uint32)
    assert [int(pruning.prune_count(s, n)) for s in sparsities] == want.tolist()
    in_jit = jax.jit(lambda: [pruning.prune_count(s, n) for s in sparsities])()
    assert [int(k) for k in in_jit] == want.tolist()
    traced = jax.jit(lambda s: pruning.prune_count(s, n, anchors=sparsities))
    np.testing.assert_array_equal(traced(np.float32(sparsities)), want)
    ramp = np.float32([0.1234567, 0.3000001, 0.6999999])  # no anchors: float32 rounding
    got = np.asarray(jax.jit(lambda s: pruning.prune_count(s, n))(ramp)).astype(np.int64)
    exact = np.round(ramp.astype(np.float64) * n)
    assert np.all(np.abs(got - exact) <= n * 2.0**-23 + 1), (got, exact)


def test_optimizer_masks_prune_exactly_round_s_n_past_2_24_candidates():
    """Through the optimizer: 2**24 + 1 weights ranked together on a polynomial schedule; its
    initial masks (a static step, on the host) and its final ones (the traced float32 schedule
    value at end_step) prune exactly round(s * n); float32 counting pruned both 1 short."""
    n = 2**24 + 1
    axes = {"big": {"wi": ("embed", "mlp")}, "one": {"wi": ("embed", "mlp")}}
    cfg = pruning.PruneConfig(sparsity=0.7, schedule="polynomial", initial_sparsity=0.3,
                              begin_step=0, end_step=2, frequency=2)
    tx = pruning.prune_optimizer(optax.identity(), cfg, axes, 2)

    @jax.jit
    def pruned_counts():
        x = jax.lax.iota(jnp.uint32, n - 1)  # magnitudes in a scrambled order, some tied
        w = ((x * jnp.uint32(2654435761)) >> 8).astype(jnp.float32) + 1.0
        params = {"big": {"wi": w.reshape(2, -1)}, "one": {"wi": jnp.ones((1, 1))}}
        pruned = lambda state: sum(jnp.sum(~m, dtype=jnp.uint32)
                                   for m in jax.tree.leaves(state.masks))
        state = tx.init(params)
        counts = [pruned(state)]
        for _ in range(2):  # masks again at step 2 (end_step), at the traced s(2)
            _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        return counts + [pruned(state)]

    assert [int(c) for c in pruned_counts()] == [round(0.3 * n), round(0.7 * n)]
    # At a static step the schedule is a Python float: one-shot style, exact on the host.
    assert pruning.sparsity_at(0, cfg, 2) == 0.3 and pruning.sparsity_at(2, cfg, 2) == 0.7


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("scope", pruning.SCOPES)
def test_unstructured_sparsity_equals_target(scan, scope):
    params, axes = _init(_t5(scan))
    cfg = pruning.PruneConfig(sparsity=0.3, scope=scope)
    pruned, masks = pruning.prune_params(params, axes, cfg)
    # Exactly round(0.3 n) of the n weights of each ranking: all kernels together (global), or
    # each kernel alone -- each layer of a scanned kernel alone (layer).
    groups = [x.size for x in compression.select(params, pruning.DEFAULT_TARGETS).values()]
    if scope == "layer" and scan:
        groups = [n // 2 if p.startswith("encoder/layers/") else n for p, n in zip(
            compression.select(params, pruning.DEFAULT_TARGETS), groups)
            for _ in range(2 if p.startswith("encoder/layers/") else 1)]
    if scope == "global":
        groups = [sum(groups)]
    assert _zero_fraction(pruned) == sum(round(0.3 * n) for n in groups) / sum(groups)
    if scope == "layer":
        for path, m in compression.flat(masks).items():
            layers = 2 if scan and path.startswith("encoder/") else 1
            rows = np.asarray(m).reshape((layers, -1))
            np.testing.assert_array_equal((~rows).sum(1), round(0.3 * rows.shape[1]), err_msg=path)
    # The smallest magnitudes went: every pruned |w| <= every kept |w| (global ranking).
    if scope == "global":
        w = np.concatenate([np.abs(np.asarray(x)).ravel() for x in
                            compression.select(params, pruning.DEFAULT_TARGETS).values()])
        m = np.concatenate([np.asarray(x).ravel() for x in
                            compression.select(masks, pruning.DEFAULT_TARGETS).values()])
        assert w[~m].max() <= w[m].min()
    untouched = "token_embedder/embedding"
    assert np.array_equal(compression.flat(pruned)[untouched], compression.flat(params)[untouched])


@pytest.mark.parametrize("structure,scope", [("heads", "global"), ("heads", "layer"),
                                             ("mlp_units", "layer")])
def test_structured_pruning_removes_whole_heads_and_units(structure, scope):
    params, axes = _init(_t5(scan=True))
    cfg = pruning.PruneConfig(sparsity=0.5, structure=structure, scope=scope)
    pruned, _ = pruning.prune_params(params, axes, cfg)
    flat = compression.flat(pruned)
    if structure == "heads":
        # Attention modules: encoder self (2 scanned layers), decoder self and cross (1 each).
        modules = ["encoder/layers/block/self_attention", "decoder/layers/block/self_attention",
                   "decoder/layers/block/cross_attention"]
        zero_heads = 0
        for mod in modules:
            q, k, v, o = (np.asarray(flat[f"{mod}/{n}"]) for n in ("query", "key", "value", "out"))
            dead_q = ~np.any(q, axis=(1, 3))  # [L, H]: heads whose query slice is all zero
            for x, axis in ((k, (1, 3)), (v, (1, 3)), (o, (2, 3))):
                np.testing.assert_array_equal(~np.any(x, axis=axis), dead_q)  # whole heads
            if scope == "layer":
                np.testing.assert_array_equal(dead_q.sum(1), H // 2)  # half of each layer's
            zero_heads += dead_q.sum()
        assert zero_heads == (2 + 1 + 1) * H // 2
    else:
        for mod in ("encoder/layers/block/mlp", "decoder/layers/block/mlp"):
            wi0, wi1, wo = (np.asarray(flat[f"{mod}/{n}"]) for n in ("wi_0", "wi_1", "wo"))
            dead = ~np.any(wi0, axis=1)  # [L, F]
            np.testing.assert_array_equal(~np.any(wi1, axis=1), dead)
            np.testing.assert_array_equal(~np.any(wo, axis=2), dead)
            np.testing.assert_array_equal(dead.sum(1), F // 2)
    report = pruning.sparsity_report(pruned, axes, cfg)
    assert report["unit_sparsity"] == 0.5


def _lm_batch(seed, n=8):
    rng = np.random.default_rng(seed)
    x = rng.integers(3, V, size=(n, 8)).astype(np.int32)
    return {"encoder_input_tokens": x, "decoder_target_tokens": x,
            "decoder_input_tokens": np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], 1)}


def test_masked_weights_stay_zero_through_training_sharded():
    """The trainer's step with AdamW (weight decay moves every weight) on a (2, 2, 2) mesh: the
    pruned weights are exactly zero after every step, the masks sit in the optimizer state with
    their params' shardings, and the loss still falls."""
    cfg = _t5()
    model = build_model(cfg)
    _, axes = _init(cfg)
    pc = pruning.PruneConfig(sparsity=0.5, structure="unstructured", scope="layer")
    tx = pruning.prune_optimizer(optax.adamw(1e-2, weight_decay=0.1), pc, axes, 20)
    mesh = partitioning.make_mesh(2, 2, 2)
    rules = partitioning.DEFAULT_RULES
    # The model's init and the masks (tx.init) both run inside the trainer's jitted init.
    state, shardings = train_state.create_train_state(model, tx, mesh, rules, jax.random.key(0))
    mask_sh = shardings.opt_state.masks["encoder"]["layers_0"]["mlp"]["wi_0"]
    assert mask_sh.spec == shardings.params["encoder"]["layers_0"]["mlp"]["wi_0"].spec
    masks = jax.tree.map(np.asarray, state.opt_state.masks)
    step = train_step.jit_train_step(train_step.make_train_step(model, tx, lambda s: 1e-2),
                                     shardings, mesh, rules)
    losses = []
    for i in range(12):
        batch = jax.device_put(_lm_batch(0), partitioning.data_sharding(mesh))
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
        for path, m in compression.flat(masks).items():
            w = np.asarray(compression.flat(state.params)[path])
            assert not np.any(w[~m]), (i, path)
    assert _zero_fraction(jax.device_get(state.params)) == pytest.approx(0.5, abs=1e-3)
    assert losses[-1] < losses[0]


def test_polynomial_schedule_grows_sparsity_and_keeps_pruned_weights_pruned():
    cfg = _t5()
    model = build_model(cfg)
    params, axes = _init(cfg)
    pc = pruning.PruneConfig(sparsity=0.8, schedule="polynomial", initial_sparsity=0.2,
                             begin_step=2, end_step=8, frequency=2)
    expect = {t: 0.8 + (0.2 - 0.8) * (1 - (t - 2) / 6) ** 3 for t in (2, 4, 6, 8)}
    tx = pruning.prune_optimizer(optax.sgd(1e-2), pc, axes, 10)
    state = jax.jit(tx.init)(params)  # one compile, not the selection op by op
    assert _zero_fraction(pruning.apply_masks(params, state.masks)) == 0.0  # s(0) before begin
    grad_fn = jax.jit(jax.grad(lambda p: model.loss_fn(p, _lm_batch(1))[0]))
    update = jax.jit(tx.update)
    seen, prev_mask = {}, None
    for t in range(1, 11):
        u, state = update(grad_fn(params), state, params)
        params = optax.apply_updates(params, u)
        seen[t] = _zero_fraction(params)
        m = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.masks)])
        if prev_mask is not None:
            assert not np.any(m & ~prev_mask)  # nothing pruned comes back
        prev_mask = m
    for t, s in expect.items():
        assert seen[t] == pytest.approx(s, abs=1e-3), (t, seen)
    assert seen[3] == seen[2] and seen[10] == seen[8] == pytest.approx(0.8, abs=1e-3)


def test_a_schedule_stretched_by_a_resume_never_unprunes(caplog, tmp_path):
    """Resumed with a higher train.num_steps, prune.end_step=0 moves the schedule's end: s(t)
    falls below what is already pruned. Those weights stayed pruned only as far as the new,
    smaller count reached (0.80 -> 0.71 here); now all stay, and the resume says so."""
    cfg = _t5()
    params, axes = _init(cfg)
    pc = pruning.PruneConfig(sparsity=0.8, schedule="polynomial", initial_sparsity=0.1,
                             begin_step=2, frequency=3)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)

    def steps(num_steps, n, state=None):
        nonlocal params
        tx = pruning.prune_optimizer(optax.sgd(0.1), pc, axes, num_steps)
        state = jax.jit(tx.init)(params) if state is None else state
        update = jax.jit(tx.update)
        for _ in range(n):
            u, state = update(grads, state, params)
            params = optax.apply_updates(params, u)
        return state

    state = steps(10, 10)
    assert _zero_fraction(params) == pytest.approx(0.8, abs=1e-3)
    pruned = [~np.asarray(m) for m in jax.tree.leaves(state.masks)]
    state = steps(20, 2, state)  # step 12 updates the masks at the new schedule's s(12) < 0.8
    assert float(pruning.sparsity_at(12, pc, 20)) < 0.75
    assert _zero_fraction(params) == pytest.approx(0.8, abs=1e-3)
    for before, now in zip(pruned, jax.tree.leaves(state.masks)):
        assert not np.any(before & np.asarray(now))  # nothing pruned comes back

    # The resume's warning: a checkpoint at step 10 of a 10-step run, resumed for 20 steps.
    step_dir = tmp_path / "checkpoints" / "10"
    (step_dir / "params").mkdir(parents=True)
    (step_dir / "config").mkdir()
    saved = {"train": {"num_steps": 10}, "prune": dataclasses.asdict(pc)}
    (step_dir / "config" / "metadata").write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        pruning.check_resume(pc, tmp_path, 10)
        assert caplog.text == ""
        pruning.check_resume(pc, tmp_path, 20)
    assert ("train.num_steps, which changed (10 -> 20): the ramp to prune.sparsity now ends at "
            "step 20; weights pruned so far stay pruned. Set --config.prune.end_step=10"
            in caplog.text)


def _gpt2_biased():
    """use_bias=True: a 2-D query_bias / value_bias [heads, kv] beside each kernel."""
    return model_config.gpt2(vocab_size=V, d_model=D, num_heads=H, head_dim=K, d_ff=F,
                             num_layers=2, max_len=16, dtype="float32")


def test_unstructured_targets_are_kernels_only():
    """Targets match kernel paths (embedding tables are [rows, embed] kernels too): not the
    per-head biases or the relative-position table their patterns also match (they were
    pruned as 2-D params)."""
    names = lambda cfg, targets: {p.rsplit("/", 1)[-1] for r in pruning.rankings(
        _init(cfg)[1], pruning.PruneConfig(targets=targets)) for p, _, _ in r.members}
    assert names(_gpt2_biased(), "query") == {"query"}
    assert names(_gpt2_biased(), "attention|embedder") == {"query", "key", "value", "out",
                                                           "embedding"}
    paths = {p for r in pruning.rankings(_init(_t5())[1], pruning.PruneConfig(
        targets="encoder")) for p, _, _ in r.members}
    assert paths and not any("relpos" in p for p in paths)


def test_bad_config_errors():
    with pytest.raises(compression.CompressionError, match="sparsity"):
        pruning.PruneConfig(sparsity=1.0)
    with pytest.raises(compression.CompressionError, match="structure"):
        pruning.PruneConfig(structure="channels")
    _, axes = _init(_t5())
    with pytest.raises(compression.CompressionError, match="matches no kernel"):
        pruning.rankings(axes, pruning.PruneConfig(targets="nope$"))
    with pytest.raises(compression.CompressionError, match=r"prune.targets='query_bias' names "
                       r"\[.*query_bias'.*\], which are not projection kernels"):
        pruning.rankings(_init(_gpt2_biased())[1], pruning.PruneConfig(targets="query_bias"))
    with pytest.raises(compression.CompressionError,
                       match=r"prune.targets='\(' is not a valid regular expression"):
        pruning.PruneConfig(targets="(")
    # A polynomial schedule that ends before it begins would prune nothing.
    with pytest.raises(compression.CompressionError,
                       match="begin_step must be >= 0 and before prune.end_step"):
        pruning.PruneConfig(schedule="polynomial", begin_step=50, end_step=10)
    with pytest.raises(compression.CompressionError, match="begin_step must be >= 0"):
        pruning.PruneConfig(begin_step=-1)
    with pytest.raises(compression.CompressionError, match="power must be positive"):
        pruning.PruneConfig(power=0.0)
    late = pruning.PruneConfig(schedule="polynomial", begin_step=50)  # end_step 0: num_steps
    with pytest.raises(compression.CompressionError, match="train.num_steps=20"):
        pruning.PruningPlugin(late, num_steps=20)
    pruning.PruningPlugin(late, num_steps=60)
    after_the_run = pruning.PruneConfig(schedule="polynomial", begin_step=50, end_step=100)
    with pytest.raises(compression.CompressionError, match=r"prune.begin_step=50 is not before "
                       r"train.num_steps=20 \(prune.end_step=100\), so nothing would be pruned"):
        pruning.PruningPlugin(after_the_run, num_steps=20)


def test_one_shot_pruning_run_through_trainer(tmp_path):
    """train.init_from + a `prune` section: the checkpoint is pruned exactly to the target and
    its optimizer state holds the masks; resuming keeps them."""
    run = testing.tiny_config("t5")
    src = tmp_path / "dense"
    checkpoints.write_config(src, run)
    # Random values in the model's param shapes: magnitude pruning needs values, not a model
    # init (which runs op by op here, slowly).
    dense = decoding_testlib.random_params(model_config.ModelConfig.from_dict(run.model), seed=1)
    checkpoints.save_params(src, dense, 0)
    run.train.init_from = str(src)
    run.train.num_steps = 2
    run.checkpoint.save_every = 2
    run.prune = dict(sparsity=0.4, structure="unstructured", scope="global")
    workdir = tmp_path / "pruned"
    assert math.isfinite(train(run, workdir).last_metrics["loss"])
    run.train.num_steps = 4
    assert train(run, workdir).step == 4
    restored = checkpoints.restore_params(workdir, 4, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dense))
    assert _zero_fraction(restored) == pytest.approx(0.4, abs=1e-4)
    assert (workdir / "checkpoints" / "4" / "opt_state").exists()  # where the masks live


def test_resume_with_other_prune_settings_is_refused(tmp_path):
    """The masks are in the latest checkpoint's optimizer state: resuming with another prune
    section (changed, added or dropped) is one error line, not old masks under new settings."""
    import json
    run = testing.tiny_config("t5")
    run.prune = dict(sparsity=0.4, structure="unstructured")
    workdir = tmp_path / "pruned"
    (workdir / "checkpoints" / "3" / "params").mkdir(parents=True)  # as all_steps sees one
    (workdir / "checkpoints" / "3" / "config").mkdir()
    (workdir / "checkpoints" / "3" / "config" / "metadata").write_text(json.dumps(run.to_dict()))
    assert isinstance(compression.from_config(run, None, None, workdir), pruning.PruningPlugin)
    changed = run.copy_and_resolve_references()
    changed.prune.sparsity = 0.6
    with pytest.raises(compression.CompressionError,
                       match=r"pruned with other settings \(prune.sparsity: 0.4 -> 0.6\): "
                       r"resume with the saved prune section") as e:
        compression.from_config(changed, None, None, workdir)
    assert "\n" not in str(e.value)
    dropped = run.copy_and_resolve_references()
    del dropped.prune
    with pytest.raises(compression.CompressionError, match="checkpoints/3 holds pruning masks"):
        compression.from_config(dropped, None, None, workdir)
    (workdir / "checkpoints" / "3" / "config" / "metadata").write_text(json.dumps(
        dropped.to_dict()))
    with pytest.raises(compression.CompressionError, match="was trained without pruning"):
        compression.from_config(run, None, None, workdir)
    assert type(compression.from_config(dropped, None, None, workdir)) is compression.Plugin
