"""LoRA: adapter count and sharding, merge math per kernel layout, training only the adapters
(base bit-identical, loss falls), the train / evaluate / load / merge path end to end
(evaluate also with --quantize=int8) on the base step the run started from, and what the merge
command and the other commands refuse (one line, nothing written)."""
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import t5x_lite
from t5x_lite import checkpoints, compression, convert, lora, partitioning
from t5x_lite import config as model_config
from t5x_lite.models import build_model
from t5x_lite.training import TrainingError, testing, train, train_state, train_step

D, H, K, F, V = 32, 2, 16, 64, 128


def _t5(scan=False, **kw):
    kw = {"d_ff": F, "num_layers": 1, "num_decoder_layers": 1, **kw}
    return model_config.t5_1_1(vocab_size=V, d_model=D, num_heads=H, head_dim=K,
                               dtype="float32", scan_layers=scan, **kw)


def _boxed(cfg):
    """Abstract boxed params: shapes and logical axes, nothing computed."""
    return jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0)))["params"]


def _random(boxed, seed=0):
    """Random values for an abstract (boxed) tree: what merge needs, without a model init."""
    rng = np.random.default_rng(seed)  # numpy: no compile per shape
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                        nn.meta.unbox(boxed))


@pytest.mark.parametrize("scan", [False, True])
def test_trainable_count_equals_hand_count_and_axes(scan):
    cfg = lora.LoraConfig(base="unused", targets="query|value|wo", rank=4)
    adapters = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(1), _boxed(_t5(scan)),
                                                         cfg))
    r = cfg.rank
    # 3 attention modules (enc self, dec self, dec cross) x {query, value}: A [D, r], B [r, H, K];
    # 2 MLPs x wo [F, D]: A [F, r], B [r, D].
    hand = 3 * 2 * (D * r + r * H * K) + 2 * (F * r + r * D)
    assert compression.param_count(nn.meta.unbox(adapters)) == hand
    axes = compression.axes_by_path(compression.logical_axes(adapters))
    lead = ("layers",) if scan else ()
    q = "decoder/layers/block/cross_attention/query" if scan else \
        "decoder/layers_0/cross_attention/query"
    assert axes[f"{q}/lora_a"] == lead + ("embed", None)
    assert axes[f"{q}/lora_b"] == lead + (None, "heads", "kv")
    wo = q.replace("cross_attention/query", "mlp/wo")
    assert axes[f"{wo}/lora_a"] == lead + ("mlp", None)
    assert axes[f"{wo}/lora_b"] == lead + (None, "embed")
    # B starts at zero: the adapted model starts as the base model.
    real = lora.init_adapters(jax.random.key(1), _boxed(_t5(scan)), cfg)
    assert all(not np.any(np.asarray(x)) for p, x in compression.flat(
        nn.meta.unbox(real)).items() if p.endswith("lora_b"))


def test_merge_equals_unmerged_low_rank_path():
    """For every kernel layout, x @ merged == x @ W + (alpha/r) (x @ A) @ B, computed apart."""
    cfg = lora.LoraConfig(base="unused", targets="query|out|wi_0|wo", rank=3, alpha=5.0)
    boxed = _boxed(_t5(scan=True))
    base = _random(boxed)
    adapters = _random(jax.eval_shape(lambda: lora.init_adapters(jax.random.key(1), boxed, cfg)),
                       seed=1)  # nonzero B
    merged = compression.flat(lora.merge(base, adapters, cfg))
    w, ad = compression.flat(base), compression.flat(adapters)
    block = "encoder/layers/block"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 5, D)).astype(np.float32)  # [L=1, T, D]
    h = rng.standard_normal((1, 5, H, K)).astype(np.float32)
    f = rng.standard_normal((1, 5, F)).astype(np.float32)
    s = cfg.scale
    cases = [  # (path, activations, kernel equation, x@A equation, (xA)@B equation)
        ("self_attention/query", x, "ltd,ldhk->lthk", "ltd,ldr->ltr", "ltr,lrhk->lthk"),
        ("self_attention/out", h, "lthk,lhkd->ltd", "lthk,lhkr->ltr", "ltr,lrd->ltd"),
        ("mlp/wi_0", x, "ltd,ldf->ltf", "ltd,ldr->ltr", "ltr,lrf->ltf"),
        ("mlp/wo", f, "ltf,lfd->ltd", "ltf,lfr->ltr", "ltr,lrd->ltd"),
    ]
    for name, act, eq, eq_a, eq_b in cases:
        p = f"{block}/{name}"
        got = jnp.einsum(eq, act, merged[p])
        low_rank = jnp.einsum(eq_b, jnp.einsum(eq_a, act, ad[f"{p}/lora_a"]), ad[f"{p}/lora_b"])
        want = jnp.einsum(eq, act, w[p]) + s * low_rank
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=p)
    untouched = f"{block}/self_attention/key"
    assert np.array_equal(merged[untouched], w[untouched])


def _biased(family, scan=False):
    """GPT-2 / BERT presets: use_bias=True, so a 2-D query_bias / value_bias [heads, kv] sits
    beside each query / value kernel."""
    preset = {"gpt2": model_config.gpt2, "bert": model_config.bert}[family]
    return preset(vocab_size=V, d_model=D, num_heads=H, head_dim=K, d_ff=F, num_layers=2,
                  max_len=16, dtype="float32", scan_layers=scan)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_default_targets_adapt_the_kernels_of_use_bias_models(family):
    """The default targets ('query|value') and the README's 'query|value|wi' adapt the query /
    value (/ wi) kernels of GPT-2 and BERT, never the biases beside them; the LoRA model's
    logits equal the plain network's on kernels merged by hand (W + (alpha/r) A @ B)."""
    cfg = _biased(family)
    assert cfg.use_bias
    stack = "decoder" if family == "gpt2" else "encoder"
    boxed = _boxed(cfg)
    layers = [f"{stack}/layers_{i}" for i in range(2)]
    qv = {f"{l}/self_attention/{n}" for l in layers for n in ("query", "value")}
    adapted = lambda ad: {p.rsplit("/", 1)[0] for p in compression.flat(nn.meta.unbox(ad))}

    lcfg = lora.LoraConfig(base="unused", rank=4, alpha=8.0)  # the default targets
    assert lcfg.targets == "query|value"
    abstract = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(1), boxed, lcfg))
    assert adapted(abstract) == qv
    shapes = {p: x.shape for p, x in compression.flat(nn.meta.unbox(abstract)).items()}
    assert shapes[f"{layers[0]}/self_attention/query/lora_a"] == (D, 4)
    assert shapes[f"{layers[0]}/self_attention/query/lora_b"] == (4, H, K)
    readme = jax.eval_shape(lambda: lora.init_adapters(
        jax.random.key(1), boxed, lora.LoraConfig(base="unused", targets="query|value|wi")))
    assert adapted(readme) == qv | {f"{l}/mlp/wi" for l in layers}
    scanned = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(1),
                                                        _boxed(_biased(family, True)), lcfg))
    assert adapted(scanned) == {f"{stack}/layers/block/self_attention/{n}"
                                for n in ("query", "value")}

    base = _random(boxed)
    adapters = _random(abstract, seed=1)  # nonzero B
    w, ad = compression.flat(base), compression.flat(adapters)
    by_hand = dict(w)
    for p in qv:
        by_hand[p] = w[p] + lcfg.scale * np.einsum("dr,rhk->dhk", ad[f"{p}/lora_a"],
                                                   ad[f"{p}/lora_b"])
    merged = compression.flat(lora.merge(base, adapters, lcfg))
    for p, x in w.items():  # biases and every other param untouched
        if p not in qv:
            assert np.array_equal(merged[p], x), p
    model = build_model(cfg)
    lora_model = lora.LoraModel(model, lcfg)
    rng = np.random.default_rng(2)
    batch = {k: rng.integers(1, V, size=(2, 8)).astype(np.int32)
             for k in model.dummy_batch(2, 8)}
    got, want, plain = jax.jit(lambda b, a, h, x: (
        lora_model.logits({"base": b, "lora": a}, x), model.logits(h, x), model.logits(b, x)))(
            base, adapters, compression.nested(by_hand), batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # logits up to ~50
    assert not np.allclose(got, plain, atol=1e-2)  # the adapters changed something


def _copy_batch(n=16, t=8, seed=0):
    """T5 'copy the input' fine-tuning task."""
    rng = np.random.default_rng(seed)
    x = rng.integers(3, V, size=(n, t)).astype(np.int32)
    x[:, -1] = 1
    return {"encoder_input_tokens": x, "decoder_target_tokens": x,
            "decoder_input_tokens": np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], 1)}


def test_train_step_trains_only_adapters_sharded():
    """On an 8-device (data 2, fsdp 2, tensor 2) mesh with the trainer's own step: loss falls,
    the base stays bit-identical, optimizer state exists only for the adapters."""
    cfg = lora.LoraConfig(base="unused", targets="query|value|wi_0|wi_1|wo", rank=4, alpha=8.0)
    model = lora.LoraModel(build_model(_t5()), cfg)
    mesh = partitioning.make_mesh(2, 2, 2)
    rules = partitioning.DEFAULT_RULES
    tx = compression.freeze_optimizer(optax.adam(1e-2), "lora")
    state, shardings = train_state.create_train_state(model, tx, mesh, rules, jax.random.key(0))
    base_before = jax.tree.map(np.asarray, state.params["base"])
    opt_leaves = compression.param_count(state.opt_state)
    n_lora = compression.param_count(state.params["lora"])
    assert opt_leaves <= 2 * n_lora + 8  # adam mu + nu (+ counts) for the adapters only
    assert (shardings.params["lora"]["encoder"]["layers_0"]["self_attention"]["query"]
            ["lora_a"].spec == jax.sharding.PartitionSpec("fsdp", None))
    step = train_step.jit_train_step(
        train_step.make_train_step(model, tx, lambda s: 1e-2), shardings, mesh, rules)
    batch = jax.device_put(_copy_batch(), partitioning.data_sharding(mesh))
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    for path, before in compression.flat(base_before).items():
        after = np.asarray(compression.flat(state.params["base"])[path])
        assert np.array_equal(before, after), path
    assert np.any(np.asarray(state.params["lora"]["encoder"]["layers_0"]["mlp"]["wo"]["lora_b"]))


def test_gradient_accumulation_carries_no_base_sized_accumulator():
    """With microbatches, the compiled step's accumulation loop carries each MLP kernel of the
    frozen base once (the params the loop reads) and no gradient of it: the base's gradients are
    stop_gradient zeros, which XLA drops from the loop. Without LoRA the same loop carries each
    kernel twice, params and accumulated gradient (so the count can see an accumulator)."""
    cfg = lora.LoraConfig(base="unused", targets="query|value|wi_0|wi_1|wo", rank=2, alpha=4.0)
    t5 = build_model(_t5())
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = partitioning.DEFAULT_RULES
    batch = jax.device_put(_copy_batch(), partitioning.data_sharding(mesh))
    kernel_shapes = (f"f32[{D},{F}]", f"f32[{F},{D}]")  # wi_0 / wi_1 and wo, enc. and dec.
    counts = {}
    for name, model, tx in (("plain", t5, optax.adam(1e-2)),
                            ("lora", lora.LoraModel(t5, cfg),
                             compression.freeze_optimizer(optax.adam(1e-2), "lora"))):
        abstract, _ = train_state.state_shardings(model, tx, mesh, rules)  # compiled, not run
        fn = train_step.make_train_step(model, tx, lambda s: 1e-2, microbatches=2)
        with partitioning.activate(mesh, rules):
            hlo = jax.jit(fn).lower(abstract, batch, jax.random.key(1)).compile().as_text()
        loops = [line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line]
        assert len(loops) == 1, name
        counts[name] = [loops[0].count(k) for k in kernel_shapes]
    assert counts == {"plain": [8, 4], "lora": [4, 2]}, counts


def test_dropout_masks_adapter_input_rows():
    cfg = lora.LoraConfig(base="unused", targets="query", rank=2, dropout=0.5)
    boxed = _boxed(_t5())
    base = _random(boxed)
    adapters = jax.tree.map(jnp.ones_like, nn.meta.unbox(jax.eval_shape(
        lambda: lora.init_adapters(jax.random.key(1), boxed, cfg))))
    p = "encoder/layers_0/self_attention/query"
    delta = compression.flat(lora.merge(base, adapters, cfg, dropout_rng=jax.random.key(0)))[p] \
        - compression.flat(base)[p]
    rows = np.asarray(jnp.abs(delta).sum(axis=(1, 2)))  # one value per input feature
    assert 0 < np.sum(rows == 0) < D  # some input features dropped, not all
    kept = np.asarray(delta)[rows > 0]
    np.testing.assert_allclose(kept, cfg.scale * cfg.rank / 0.5, rtol=1e-5)  # 1/(1-p) rescale


def test_bad_config_errors():
    with pytest.raises(compression.CompressionError, match="matches no kernel"):
        lora.init_adapters(jax.random.key(0), _boxed(_t5()),
                           lora.LoraConfig(base="x", targets="nothing_like_this"))
    # A pattern naming a param that is not a projection kernel (alone or beside kernels).
    for targets in ("query_bias", "query|query_bias"):
        with pytest.raises(compression.CompressionError, match="not (a )?projection kernel"):
            lora.init_adapters(jax.random.key(0), _boxed(_biased("gpt2")),
                               lora.LoraConfig(base="x", targets=targets))
    with pytest.raises(compression.CompressionError, match="rank"):
        lora.LoraConfig(rank=0)
    # nan / inf: a NaN merged kernel at step 0 ("diverged"); 0: adapters that never move
    for alpha in (float("nan"), float("inf"), 0.0, -2.0):
        with pytest.raises(compression.CompressionError,
                           match=f"lora.alpha must be a finite number > 0, got {alpha}"):
            lora.LoraConfig(alpha=alpha)
    with pytest.raises(compression.CompressionError, match="Unknown lora option"):
        lora.LoraConfig.from_dict({"base": "x", "rnak": 4})
    with pytest.raises(compression.CompressionError,
                       match=r"lora.targets='\(' is not a valid regular expression"):
        lora.LoraConfig(base="x", targets="(")


@functools.lru_cache(maxsize=None)
def _jitted_init(cfg):
    """The model's own init, compiled once per model config (op by op, a process's first init
    takes ~7 s)."""
    model = build_model(cfg)
    return jax.jit(lambda key: nn.meta.unbox(model.init(key)["params"]))


def _save_base(workdir, cfg_run, step=0, seed=7):
    params = _jitted_init(model_config.ModelConfig.from_dict(cfg_run.model))(jax.random.key(seed))
    checkpoints.write_config(workdir, cfg_run)
    checkpoints.save_params(workdir, params, step)
    return params


HF_SOURCE = {"model_type": "t5", "decoder_start_token_id": 0, "eos_token_id": 5,
             "source_only_field": "kept"}


def test_lora_run_through_trainer_resume_load_and_merge(tmp_path):
    run = testing.tiny_config("t5")
    base_dir = tmp_path / "base"
    _save_base(base_dir, run)
    (base_dir / convert.HF_SOURCE_CONFIG).write_text(json.dumps(HF_SOURCE))  # a converted base
    run.train.num_steps = 4
    run.checkpoint.save_every = 2
    run.lora = dict(base=str(base_dir), targets="query|value", rank=4, alpha=8.0, dropout=0.0)
    workdir = tmp_path / "lora"
    result = train(run, workdir)
    assert result.step == 4 and math.isfinite(result.last_metrics["loss"])
    # The first start pins the base's step in the run's config.
    assert checkpoints.read_config(workdir).lora.base_step == 0

    # The base trains on: a later step with other weights. Resuming, load, evaluate and merge
    # keep using step 0, the one the adapters were trained on.
    _save_base(base_dir, testing.tiny_config("t5"), step=1, seed=8)

    # The checkpoint holds only the adapters: (1+1+1) attention modules x {query, value}.
    shapes = checkpoints.params_shapes(workdir, 4)
    assert len(shapes) == 12 and all(k.endswith(("['lora_a']", "['lora_b']")) for k in shapes)

    # Resuming continues from the adapters (and re-attaches the base).
    run.train.num_steps = 6
    assert train(run, workdir).step == 6
    assert checkpoints.read_config(workdir).lora.base_step == 0
    run.lora.base_step = 1  # another base step for these adapters: refused before any work
    with pytest.raises(compression.CompressionError, match="trained on step 0 of base "):
        train(run, workdir)
    run.lora.base_step = -1

    # load() merges adapters into the base; equal to the adapter model on the same adapters.
    loaded = t5x_lite.load(workdir)
    lora_cfg = lora.LoraConfig.from_dict(run.lora)
    model = lora.LoraModel(loaded.model, lora_cfg)
    # The shapes to restore (no init run), on one device.
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    boxed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                         nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0))["params"]))
    base_params = checkpoints.restore_params(base_dir, 0, boxed["base"])
    adapters = checkpoints.restore_params(workdir, 6, boxed["lora"])
    batch = _copy_batch(4, 8, seed=3)
    batch = {k: np.minimum(v, loaded.config.vocab_size - 1) for k, v in batch.items()}
    # The adapter model's logits and the bare base's, in one compiled program (not op by op).
    want, base_logits = jax.jit(lambda p, b: (model.logits(p, b), loaded.model.logits(
        p["base"], b)))({"base": base_params, "lora": adapters}, batch)
    got = loaded.logits(batch["encoder_input_tokens"],
                        decoder_input_ids=batch["decoder_input_tokens"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, base_logits, atol=1e-6)  # adapters changed something

    # The evaluate command on the LoRA workdir (merged on load), float and int8 weights.
    from t5x_lite.evaluation import EvalSettings, run as evaluate
    ev = {q: evaluate(None, workdir, EvalSettings(name=q, quantize=q, batch_size=8))[0]
          for q in ("none", "int8")}
    assert math.isfinite(ev["none"]["loss"])
    assert abs(ev["int8"]["loss"] - ev["none"]["loss"]) < 0.05

    # merge writes a plain checkpoint that loads to the same logits, with the base's HF config
    # (a later `convert --to_hf` keeps its fields).
    step = lora.merge_workdir(workdir, tmp_path / "merged")
    assert step == 6
    merged = t5x_lite.load(tmp_path / "merged")
    assert "lora" not in merged.run_config
    np.testing.assert_allclose(
        merged.logits(batch["encoder_input_tokens"],
                      decoder_input_ids=batch["decoder_input_tokens"]),
        got, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "merged" / convert.HF_SOURCE_CONFIG).read_text()) == HF_SOURCE
    # Trained here on data that ends in id 1 (vocab.EOS_ID): the run, its merge and the merge's
    # HF export end there, not at the converted base's eos_token_id.
    assert t5x_lite.load(base_dir, step=0).eos_id == HF_SOURCE["eos_token_id"] != 1
    assert loaded.eos_id == merged.eos_id == 1
    convert.workdir_to_hf(tmp_path / "merged", tmp_path / "merged_hf")
    assert json.loads((tmp_path / "merged_hf" / "config.json").read_text())["eos_token_id"] == 1

    # Without the pinned base step, the adapters are refused (not applied to another step).
    shutil.rmtree(base_dir / "checkpoints" / "0")
    with pytest.raises(compression.CompressionError,
                       match=r"step 0 of their base .* \(available: \[1\]\)"):
        t5x_lite.load(workdir)


def _fake_lora_run(tmp_path, steps=(2, 4)):
    """A base (step 0) and a LoRA workdir with random adapters at `steps` (at step 0: as a run
    starts them, B = 0): no training."""
    run = testing.tiny_config("t5")
    base_dir = tmp_path / "base"
    _save_base(base_dir, run)
    run.lora = dict(base=str(base_dir), targets="query|value", rank=4, alpha=8.0, dropout=0.0)
    boxed = _boxed(model_config.ModelConfig.from_dict(run.model))
    cfg = lora.LoraConfig.from_dict(run.lora)
    untrained = nn.meta.unbox(lora.init_adapters(jax.random.key(1), boxed, cfg))
    adapters = _random(untrained)
    workdir = tmp_path / "lora"
    checkpoints.write_config(workdir, run)
    for step in steps:
        checkpoints.save_params(workdir, untrained if step == 0 else adapters, step)
    return run, base_dir, workdir


def test_lora_step_0_ends_where_its_base_and_its_merge_do(tmp_path):
    """Step 0 of a LoRA run is its base's weights (B = 0): it ends with the converted base's
    eos_token_id, as its merge (saved at step 0 beside the base's hf_config.json) and that
    merge's HF export do. A later step was trained here, on data that ends in 1: so are its
    merge and export, though the merge keeps the base's hf_config.json. Likewise the stop ids
    of the base's generation config (5 and 7)."""
    _, base_dir, workdir = _fake_lora_run(tmp_path, steps=(0, 2))
    (base_dir / convert.HF_SOURCE_CONFIG).write_text(json.dumps(HF_SOURCE))  # ends with 5
    (base_dir / "hf_generation_config.json").write_text('{"eos_token_id": [5, 7]}')
    for step, want, stops in ((0, 5, [5, 7]), (2, 1, 1)):
        merged, exported = tmp_path / f"merged_{step}", tmp_path / f"hf_{step}"
        lora.merge_workdir(workdir, merged, step=step)
        for m in (t5x_lite.load(workdir, step=step), t5x_lite.load(merged)):
            assert m.eos_id == want and list(m.stop_ids) == (stops if step == 0 else [1])
        convert.workdir_to_hf(merged, exported)
        assert json.loads((exported / "config.json").read_text())["eos_token_id"] == want
        written = json.loads((exported / "generation_config.json").read_text())
        assert written["eos_token_id"] == stops


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_merge_refuses_outputs_it_would_break_and_leaves_nothing_on_failure(tmp_path,
                                                                           monkeypatch):
    _, base_dir, workdir = _fake_lora_run(tmp_path)
    _save_base(tmp_path / "other", testing.tiny_config("t5"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    (tmp_path / "file").write_text("x")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # `--output=` would have merged into it
    before = _listing(tmp_path)
    config_before = (workdir / checkpoints.CONFIG_FILE).read_text()
    refused = {workdir: "is the LoRA workdir;",
               base_dir: "is the LoRA run's base;",
               base_dir / "checkpoints" / "9": "is inside the checkpoints/ of the LoRA run's base",
               tmp_path / "other": "is a t5x_lite workdir",
               tmp_path / "notes": "is not empty",
               tmp_path / "file": "is a file, not a directory",
               tmp_path / "file" / "x": "its parent .* is a file",
               "": "--output is empty;"}
    for out, message in refused.items():
        with pytest.raises(compression.CompressionError, match=message):
            lora.merge_workdir(workdir, out)
    assert _listing(tmp_path) == before
    assert (workdir / checkpoints.CONFIG_FILE).read_text() == config_before

    # A failure while writing (here: after the checkpoint is written) leaves no output and no
    # temporary directory.
    save = checkpoints.save_params

    def save_then_fail(*args, **kwargs):
        save(*args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints, "save_params", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        lora.merge_workdir(workdir, tmp_path / "merged")
    assert _listing(tmp_path) == before
    monkeypatch.undo()

    # An empty directory is fine: it becomes the merged workdir.
    (tmp_path / "empty").mkdir()
    assert lora.merge_workdir(workdir, tmp_path / "empty", step=2) == 2
    assert checkpoints.all_steps(tmp_path / "empty") == [2]


def _lora_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "t5x_lite.lora", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_merge_command_one_line_errors_and_quiet_console(tmp_path):
    _, _, workdir = _fake_lora_run(tmp_path)
    out = tmp_path / "merged"
    for extra, want in (
            (["--step=3"], f"No checkpoint for step 3 in {workdir}; available: [2, 4]"),
            (["more"], "unexpected arguments ['more']")):
        r = _lora_cli(f"--workdir={workdir}", f"--output={out}", *extra)
        assert r.returncode == 1 and r.stderr.strip() == f"lora: error: {want}", r.stderr[-3000:]
        assert not out.exists()
    r = _lora_cli(f"--workdir={workdir}", f"--output={out}")
    assert r.returncode == 0 and "merged adapters" in r.stdout, r.stderr[-3000:]
    assert not re.findall(r"^I\d{4} .*", r.stderr, re.M), r.stderr[-2000:]  # no orbax INFO page
    assert checkpoints.all_steps(out) == [4]


def test_lora_workdir_where_a_plain_checkpoint_is_expected(tmp_path):
    """convert --to_hf, train.init_from and lora.base (distill.teacher: distillation_test) name
    a LoRA workdir: one line saying to merge it first; train makes no workdir."""
    run, _, workdir = _fake_lora_run(tmp_path)
    hint = (rf"{workdir} is a LoRA run: its checkpoints hold only adapters; merge them into the "
            rf"base first with `python -m t5x_lite.lora --workdir={workdir} --output=DIR`")
    with pytest.raises(checkpoints.CheckpointError, match=hint):
        convert.workdir_to_hf(workdir, tmp_path / "hf")
    plain = testing.tiny_config("t5")
    plain.train.init_from = str(workdir)
    adapters_on_adapters = testing.tiny_config("t5")
    adapters_on_adapters.lora = dict(run.lora, base=str(workdir))
    for config in (plain, adapters_on_adapters):
        with pytest.raises((checkpoints.CheckpointError, TrainingError), match=hint):
            train(config, tmp_path / "new")
        assert not (tmp_path / "new").exists()
    assert not (tmp_path / "hf").exists()


def test_evaluating_another_lora_runs_checkpoint_merges_it_into_its_own_base(tmp_path):
    """`evaluate --workdir=L1 --checkpoint=L2`: L2's adapters merge into L2's base (they were
    merged into L1's: neither model's numbers); another model is one line."""
    from t5x_lite.evaluation import EvalSettings
    from t5x_lite.evaluation.runner import EvalError, Evaluator

    run1, _, lora1 = _fake_lora_run(tmp_path / "a")
    _, base2, lora2 = _fake_lora_run(tmp_path / "b")
    shutil.rmtree(base2)
    _save_base(base2, run1, seed=8)  # L2's base: other weights
    evaluator = Evaluator(run1, EvalSettings())
    via_l1 = jax.device_get(evaluator.load(lora2, 4).params)
    own = jax.device_get(t5x_lite.load(lora2).params)
    for a, b in zip(jax.tree.leaves(via_l1), jax.tree.leaves(own)):
        np.testing.assert_array_equal(a, b)
    # Trained with other dropout / remat / compute dtype: the same model.
    same = testing.tiny_config("t5", dropout_rate=0.1, remat="full", dtype="bfloat16")
    same.lora = dict(run1.lora, base=str(base2))
    checkpoints.write_config(lora2, same)
    for a, b in zip(jax.tree.leaves(jax.device_get(evaluator.load(lora2, 4).params)),
                    jax.tree.leaves(own)):
        np.testing.assert_array_equal(a, b)
    other = testing.tiny_config("t5", d_model=48)
    other.lora = dict(run1.lora)
    checkpoints.write_config(lora2, other)
    with pytest.raises(EvalError, match=f"--checkpoint {re.escape(str(lora2))} holds another "
                       "model than the one evaluated: d_model: 48 vs 32"):
        evaluator.load(lora2, 4)
