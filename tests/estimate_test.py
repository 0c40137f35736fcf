"""The estimator: exact parameter counts, hand-counted FLOPs, and memory vs XLA's own analysis.

The XLA checks compile the trainer's real train step (abstract inputs, nothing allocated) and
compare `memory_analysis()` with the estimate. XLA:CPU computes bf16 in f32, so bf16 configs are
checked as their float32 variant (the estimator sizes both sides the same way). The small
configs (t5_small, gpt2_small, gpt_1b) take ~20-50 s each to compile on 2 cores: they run when
T5X_LITE_SLOW_TESTS=1 (README.md lists their measured ratios).
"""
import glob
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from t5x_lite import estimate, estimate_flops as ef, estimate_memory as em, estimate_xla
from t5x_lite import partitioning
from t5x_lite.config import ModelConfig
from t5x_lite.models import LossConfig, build_model
from t5x_lite.partitioning import MeshError
from t5x_lite.training import flops as trainer_flops
from t5x_lite.training import optimizers

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted(glob.glob(str(REPO / "configs" / "*.py")))
SLOW = pytest.mark.skipif(not os.environ.get("T5X_LITE_SLOW_TESTS"),
                          reason="compiles a small config (20-50 s); set T5X_LITE_SLOW_TESTS=1")
TOLERANCE = 0.10


def load_config(name_or_path: str):
    path = (name_or_path if name_or_path.endswith(".py")
            else str(REPO / "configs" / f"{name_or_path}.py"))
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def with_(config, **dotted):
    """A copy with `section.key=value` overrides (`model.dtype`, `train.batch_size`, ...)."""
    import ml_collections
    c = ml_collections.ConfigDict(config.to_dict())
    for key, value in dotted.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_param_count_formula_equals_the_real_tree(path):
    cfg = ModelConfig.from_dict(load_config(path).model)
    exact = ef.count_params(build_model(cfg))
    assert ef.param_count_formula(cfg) == exact
    assert sum(ef.param_count_by_part(cfg).values()) == exact


def test_abstract_count_equals_materialized_params():
    cfg = ModelConfig.from_dict(load_config("tiny_t5").model)
    model = build_model(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0)))["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == ef.count_params(model) == 2_885_376


def test_flops_equal_a_hand_count_for_tiny_gpt():
    # tiny_gpt: V=8192, D=128, H*K=4*32=128, F=512, L=2, gelu (1 input projection), B=16, S=128.
    cfg = ModelConfig.from_dict(load_config("tiny_gpt").model)
    f = ef.step_flops(cfg, batch=16, length=128)
    tokens = 16 * 128
    per_token_layer = 2 * (4 * 128 * 128 + 2 * 128 * 512)  # q, k, v, o + wi, wo
    assert f.dense == 2 * tokens * per_token_layer
    assert f.attention == 2 * 16 * 4 * 128 * 128 * 128  # L * B * (q.k + p.v) = 4*T*T*d_attn
    assert f.head == 2 * tokens * 128 * 8192
    assert f.train == 3 * (f.dense + f.attention + f.head) == 18_522_046_464
    # The per-token form of the issue: 6 * N_mm + 12 * L * T * d_attn.
    n_mm = 2 * (4 * 128 * 128 + 2 * 128 * 512) + 128 * 8192
    assert ef.matmul_params(cfg) == n_mm
    assert f.per_token == 6 * n_mm + 12 * 2 * 128 * 128
    assert f.tokens == tokens and f.recompute == 0


def test_flops_equal_a_hand_count_for_tiny_t5():
    # Encoder: S=128 tokens through 2 layers; decoder: T=32 tokens through 2 layers with
    # cross-attention whose k, v projections run over the S encoder outputs.
    cfg = ModelConfig.from_dict(load_config("tiny_t5").model)  # D=H*K=128, F=256, gated
    b, s, t, d, f_, v = 16, 128, 32, 128, 256, 8192
    enc = 2 * b * s * (4 * d * d + 3 * d * f_) * 2 + 2 * 4 * b * s * s * d
    dec = 2 * 2 * (b * t * (4 * d * d + 3 * d * f_ + 2 * d * d) + b * s * 2 * d * d)
    dec += 2 * 4 * b * (t * t + t * s) * d
    head = 2 * b * t * d * v
    f = ef.step_flops(cfg, b, s, t)
    assert f.forward == enc + dec + head
    assert f.tokens == b * (s + t)


@pytest.mark.parametrize("name", ["tiny_t5", "tiny_gpt", "tiny_bert", "gpt_1b", "t5_1_1_base"])
def test_flops_agree_with_the_trainers_mfu_count(name):
    c = load_config(name)
    cfg = ModelConfig.from_dict(c.model)
    s, t = estimate_xla.sequence_lengths(c)
    k = LossConfig.for_run(c).mlm_predictions  # tiny_bert: the head on 19 of 128 positions
    ours = ef.step_flops(cfg, c.train.batch_size, s, t, k).train
    assert ours == trainer_flops.train_step_flops(cfg, c.train.batch_size, s, t, k)


def test_flops_equal_a_hand_count_for_tiny_bert():
    # tiny_bert: V=8192, D=H*K=128, F=512, gelu, L=2, B=16, S=128; the MLM head (mlm_dense d x d,
    # then the tied d x V projection) runs on the 19 scored positions per row.
    c = load_config("tiny_bert")
    cfg = ModelConfig.from_dict(c.model)
    b, s, d, f_, v, k = 16, 128, 128, 512, 8192, 19
    assert LossConfig.for_run(c).mlm_predictions == k
    fl = ef.step_flops(cfg, b, s, predictions=k)
    assert fl.dense == 2 * 2 * b * s * (4 * d * d + 2 * d * f_)
    assert fl.attention == 2 * 4 * b * s * s * d
    assert fl.head == 2 * b * k * (d * d + d * v)
    assert ef.matmul_params(cfg) == 2 * (4 * d * d + 2 * d * f_) + d * d + d * v


def _per_token_line(r):
    return next(x for x in estimate.format_report(r).splitlines() if "per token" in x)


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt", "tiny_t5"])
def test_report_per_token_terms_are_direct_and_non_negative(name):
    import re
    r = estimate.estimate(load_config(name), mesh=(1, 1, 1))
    fl = r["flops"]
    line = _per_token_line(r)
    numbers = [float(x) for x in re.findall(r"[-+]?\d[\d.]*e[-+]\d+", line)]
    assert numbers and all(x >= 0 for x in numbers), line
    attention = float(re.search(r"attention ([-+]?[\d.]+e[-+]\d+)", line).group(1))
    direct = 3 * fl["attention"] / fl["tokens_per_step"]
    assert attention == pytest.approx(direct, rel=1e-3), line
    if name == "tiny_bert":  # the head on its 19 scored positions, printed on its own
        head = float(re.search(r"MLM head ([\d.]+e[-+]\d+) \(on 19 of 128 positions", line)
                     .group(1))
        assert head == pytest.approx(3 * fl["head"] / fl["tokens_per_step"], rel=1e-3), line
    if name != "tiny_t5":  # the printed terms add up to the per-token total
        assert sum(numbers[1:]) == pytest.approx(fl["per_token"], rel=1e-3), line


def test_remat_adds_hardware_flops_only():
    c = load_config("gpt_1b")  # remat=dots_no_batch: attention matmuls are recomputed
    cfg = ModelConfig.from_dict(c.model)
    f = ef.step_flops(cfg, 8, 2048)
    assert f.recompute == f.attention and f.hardware == f.train + f.attention
    full = ef.step_flops(ModelConfig.from_dict({**c.model.to_dict(), "remat": "full"}), 8, 2048)
    wo = 2 * cfg.d_model * cfg.d_ff * cfg.num_layers * 8 * 2048  # not recomputed (below)
    assert full.hardware == pytest.approx(full.train + full.dense + full.attention - wo)


def jaxpr_matmul_flops(jaxpr, repeat: int = 1) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr, a scan body counted `length` times."""
    from jax.extend import core as jcore
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += repeat * 2 * eqn.outvars[0].aval.size * math.prod(lhs[i] for i in contract)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                sub = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
                if isinstance(sub, jcore.Jaxpr):
                    total += jaxpr_matmul_flops(sub, repeat * times)
    return total


@pytest.mark.parametrize("name", ["tiny_gpt", "tiny_t5", "tiny_bert"])  # gelu, gated-gelu, gelu
@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_recompute_equals_the_matmuls_of_the_real_gradient(name, remat):
    # Trace (nothing compiled) the real loss gradient with and without remat and count its
    # matmuls. `full` re-runs each layer's forward except its MLP output matmul (wo): the
    # layer's backward needs only the layer's input, so JAX drops that last matmul.
    import jax.numpy as jnp
    from t5x_lite.models import abstract_variables

    def grad_flops(remat):
        c = with_(load_config(name), model__remat=remat, model__scan_layers=True,
                  model__causal_blocks=1)  # the full score square, as the formula counts
        model = build_model(ModelConfig.from_dict(c.model), LossConfig.for_run(c))
        params = nn.meta.unbox(abstract_variables(model))["params"]
        batch = {k: jax.ShapeDtypeStruct(s, jnp.int32)
                 for k, s in estimate_xla.batch_features(c).items()}
        grad = jax.grad(lambda p, b: model.loss_fn(p, b)[0])
        return jaxpr_matmul_flops(jax.make_jaxpr(grad)(params, batch).jaxpr), c

    plain, _ = grad_flops("none")
    real, c = grad_flops(remat)
    cfg = ModelConfig.from_dict(c.model)
    est = ef.step_flops(cfg, c.train.batch_size, *estimate_xla.sequence_lengths(c),
                        LossConfig.for_run(c).mlm_predictions)
    assert est.recompute == real - plain
    assert est.hardware == pytest.approx(real, rel=1e-3)  # T5: + its small bias matmuls


def test_peak_flops_table_matches_the_trainers():
    # The device kinds jax reports (a v5p chip is "TPU v5", a v6e "TPU v6 lite").
    kinds = {"tpu_v4": "TPU v4", "tpu_v5e": "TPU v5 lite", "tpu_v5p": "TPU v5",
             "tpu_v6e": "TPU v6 lite", "a100": "NVIDIA A100-SXM4-80GB",
             "h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}
    for name, acc in ef.ACCELERATORS.items():
        assert trainer_flops.peak_flops_per_device(kinds[name]) == acc.peak_bf16_flops, name


def test_step_time_and_chinchilla_arithmetic():
    c = load_config("tiny_gpt")
    r = estimate.estimate(c, mesh=(8, 1, 1), mfu=0.5, accelerators=["h100"])
    f = r["flops"]
    step = f["train_step"] / (8 * 989e12 * 0.5)
    assert r["accelerators"]["h100"]["step_seconds"] == pytest.approx(step)
    n = r["model"]["params"]
    assert r["compute_optimal"]["tokens"] == 20 * n
    steps = 20 * n / (c.train.batch_size * 128)
    assert r["compute_optimal"]["steps"] == pytest.approx(steps)
    assert r["accelerators"]["h100"]["compute_optimal_days"] == pytest.approx(steps * step / 86400)
    assert r["weights_bytes"]["fp32"] == 4 * n and r["weights_bytes"]["bf16"] == 2 * n


@pytest.mark.parametrize("name", ["tiny_t5", "tiny_gpt", "tiny_bert"])
def test_int8_weight_bytes_are_what_quantize_int8_holds(name):
    """int8 kernels plus their float32 scales, and every other param (norms, biases, position
    tables) still float32: 1 byte per param undercounted by 3-12%."""
    from t5x_lite import compression, quantization

    c = load_config(name)
    boxed = build_model(ModelConfig.from_dict(c.model)).init(jax.random.key(0))["params"]
    held = quantization.quantize_params(nn.meta.unbox(boxed), compression.logical_axes(boxed))
    real = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held))
    r = estimate.estimate(c, mesh=(1, 1, 1))
    assert r["weights_bytes"]["int8"] == real
    assert real > 1.02 * r["model"]["params"]


@pytest.mark.parametrize("name", ["tiny_t5", "tiny_gpt"])  # adafactor, adamw
def test_optimizer_state_bytes_equal_the_real_optimizer_state(name):
    c = load_config(name)
    params = nn.meta.unbox(ef_abstract_params(c))
    tx, _ = optimizers.make_optimizer(c.optimizer, c.train.num_steps)
    real = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))
    state = em.state_bytes(c, em.MeshSizes(1, 1, 1))
    assert state["optimizer"] == real
    n = sum(x.size for x in jax.tree.leaves(params))
    assert state["params"] == 4 * n
    if c.optimizer.name == "adamw":
        assert 8 * n <= real <= 8 * n + 64  # two fp32 moments (+ step counters)
    else:
        assert real < 2 * n  # factored second moments: far below Adam's 8 B/param


def ef_abstract_params(c):
    from t5x_lite.models import abstract_variables
    return abstract_variables(build_model(ModelConfig.from_dict(c.model)))["params"]


def test_fsdp_and_tensor_sharding_divide_the_state():
    c = load_config("gpt_1b")
    one = em.state_bytes(c, em.MeshSizes(1, 1, 1))
    fsdp = em.state_bytes(c, em.MeshSizes(1, 16, 1))
    # Everything with an `embed` dimension is split 16 ways; only norm scales are replicated.
    assert one["params"] / 16 <= fsdp["params"] < one["params"] / 15
    assert one["optimizer"] / 16 <= fsdp["optimizer"] < one["optimizer"] / 15
    data = em.state_bytes(c, em.MeshSizes(16, 1, 1))
    assert data["params"] == one["params"]  # data parallelism replicates


def test_weights_sharded_over_tensor_only_are_not_fsdp_gathered():
    # Rules mapping `embed` to no axis leave fsdp splitting only the batch: nothing is
    # FSDP-sharded, so nothing is all-gathered, however many weights the tensor axis splits.
    c = load_config("tiny_gpt")
    c.mesh.rules = [[k, None if k == "embed" else v] for k, v in partitioning.DEFAULT_RULES]
    state = em.state_bytes(c, em.MeshSizes(1, 2, 2))
    assert state["gathered"] == 0
    assert state["params"] < em.state_bytes(c, em.MeshSizes(1, 2, 1))["params"]  # tensor splits


def test_bad_mesh_and_inputs_fail_with_one_clear_line():
    c = load_config("tiny_gpt")  # 4 heads
    with pytest.raises(MeshError, match="does not divide it"):
        estimate.estimate(c, mesh=(1, 1, 8))
    with pytest.raises(MeshError, match="needs 6 devices but 8"):
        estimate.estimate(c, mesh=(2, 3, 1), num_devices=8)
    with pytest.raises(estimate.EstimateError, match="has a -1"):
        estimate.estimate(c, mesh=(-1, 1, 1))
    with pytest.raises(estimate.EstimateError, match=r"^train.batch_size=\d+ must split evenly "
                                                     r"over the batch shards data\*fsdp=32$"):
        estimate.estimate(c, mesh=(32, 1, 1))
    # Each microbatch too (XLA padded 4 microbatches of 4 rows over 8 shards with copies:
    # more memory than 2 microbatches, the same compute per device).
    c.train.batch_size, c.train.microbatches = 16, 4
    with pytest.raises(estimate.EstimateError, match=r"^train.batch_size=16 in "
                                                     r"train.microbatches=4 of 4 rows must split "
                                                     r"evenly over the batch shards data\*fsdp=8"):
        estimate.estimate(c, mesh=(1, 8, 1))
    c.train.microbatches = 2
    estimate.estimate(c, mesh=(1, 8, 1))
    with pytest.raises(estimate.EstimateError, match="mfu"):
        estimate.estimate(c, mfu=1.5)
    with pytest.raises(estimate.EstimateError, match="Unknown accelerators"):
        estimate.estimate(c, accelerators=["tpu_v9"])
    with pytest.raises(MeshError, match="three integers"):
        partitioning.parse_mesh("8,1")


def test_compression_sections_are_named_not_silently_ignored():
    plain = estimate.estimate(load_config("tiny_t5"), mesh=(1, 1, 1))
    assert plain["notes"] == []
    for name in ("lora_tiny_t5", "distill_tiny_t5", "prune_tiny_t5"):
        r = estimate.estimate(load_config(name), mesh=(1, 1, 1))
        section = name.split("_")[0]
        assert len(r["notes"]) == 1 and f"'{section}' section is not modelled" in r["notes"][0]
        assert f"NOTE: the '{section}' section" in estimate.format_report(r)


def test_rule_of_thumb_is_shown_beside_the_real_figure():
    r = estimate.estimate(load_config("gpt_1b"), mesh=(1, -1, 1), num_devices=64)
    n = r["model"]["params"]
    assert r["rule_of_thumb"] == {"store": 4 * n, "train_adam": 16 * n, "train_mixed": 24 * n}
    text = estimate.format_report(r, "configs/gpt_1b.py")
    assert "rule of thumb: 4 B/param" in text and "Why the total differs" in text
    # gpt_1b on 64 v4 chips: activations dominate, far beyond the 16 B/param guess per device.
    mem = r["memory_per_device"]
    assert mem["activations"] > 10 * (mem["params"] + mem["gradients"] + mem["optimizer"])


def _check_memory(config, mesh=(1, 1, 1)):
    checked = estimate_xla.with_overrides(config, dtype="float32")
    sizes = em.MeshSizes(*mesh)
    devices = jax.devices()[:sizes.num_devices]
    xla = estimate_xla.xla_stats(checked, partitioning.make_mesh(*mesh, devices=devices))
    est = em.estimate_memory(checked, sizes)
    ratio = est.total / xla.peak
    assert abs(ratio - 1) <= TOLERANCE, (f"estimate {est.total / 2**20:.1f} MiB vs XLA "
                                         f"{xla.peak / 2**20:.1f} MiB (ratio {ratio:.3f})")
    return xla, checked


@pytest.mark.parametrize("name", ["tiny_t5", "tiny_gpt", "tiny_bert"])
def test_memory_estimate_matches_xla_for_tiny_configs(name):
    xla, checked = _check_memory(load_config(name))
    # XLA's own FLOP count (elementwise included) is within a few % of the matmul count.
    cfg = ModelConfig.from_dict(checked.model)
    model_flops = ef.step_flops(cfg, checked.train.batch_size,
                                *estimate_xla.sequence_lengths(checked),
                                LossConfig.for_run(checked).mlm_predictions).train
    assert 1.0 <= xla.flops / model_flops < 1.05


def test_verify_flags_xla_flops_of_loops_as_not_comparable():
    # cost_analysis() counts a while-loop body once: with scanned layers and 2 microbatches
    # XLA reports about a quarter of the step's FLOPs, which must not read as a FLOPs check.
    c = with_(load_config("tiny_gpt"), model__scan_layers=True, train__microbatches=2,
              train__batch_size=16)
    v = estimate.verify(c, mesh=(8, 1, 1))  # a mesh over the 8 test devices
    assert v["xla_flops_loops"] == ["scanned layers", "2 microbatches"]
    assert v["xla_flops_per_device"] < 0.6 * v["hardware_flops_per_device"]
    r = {**estimate.estimate(c, mesh=(8, 1, 1)), "verify": v}
    assert "NOTE: not comparable: XLA's cost_analysis counts a loop body once (here: scanned " \
           "layers and 2 microbatches)" in estimate.format_report(r)
    r["verify"] = {**v, "xla_flops_loops": estimate.xla_loops(load_config("tiny_gpt"))}
    assert r["verify"]["xla_flops_loops"] == []  # unscanned, one microbatch: comparable
    assert "not comparable" not in estimate.format_report(r)


def test_memory_estimate_matches_xla_for_prefix_lm():
    # A prefix-LM batch makes GPT attend over the whole square (no causal query blocks): at
    # length 512 the scores are a large share, and counting 5/8 of them was 16% short.
    c = with_(load_config("tiny_gpt"), data__objective="prefix_lm", data__seq_len=512,
              model__max_len=512)
    _check_memory(c)


def test_causal_blocks_apply_to_the_dot_product_attention_impl_with_dropout():
    # layers.dot_product_attention hands dropout to its own blocked path, whatever the impl.
    base = load_config("tiny_gpt").model.to_dict()
    dpa = lambda **kw: ModelConfig.from_dict({**base, "attention_impl": "dot_product_attention",
                                              "causal_blocks": 4, **kw})
    assert em.causal_score_fraction(dpa(dropout_rate=0.0), 128) == 1.0
    assert em.causal_score_fraction(dpa(dropout_rate=0.1), 128) == 5 / 8


@pytest.mark.parametrize("name", ["tiny_t5", "tiny_bert"])
def test_memory_estimate_matches_xla_with_dropout_masks_shared_along_the_sequence(name):
    # Shared masks are drawn per row, but the activation masks are still broadcast to full size
    # and the attention mask's product with the probs is kept: counting the draws alone was
    # 0.92-0.93 of XLA's peak (tiny_t5, tiny_bert), counting them per element 1.07-1.14.
    _check_memory(with_(load_config(name), model__dropout_rate=0.1, model__dropout_broadcast=True))


def test_memory_estimate_matches_xla_sharded_scanned_remat():
    # FSDP over 8 devices, scanned layers, dots_no_batch remat: gpt_1b's recipe on tiny_gpt.
    c = with_(load_config("tiny_gpt"), model__scan_layers=True, model__remat="dots_no_batch",
              mesh__data=1, mesh__fsdp=8)
    _check_memory(c, mesh=(1, 8, 1))


@pytest.mark.parametrize("name,remat,length", [
    ("tiny_t5", "none", 128), ("tiny_t5", "full", 128),
    ("tiny_bert", "none", 128), ("tiny_bert", "full", 128), ("tiny_bert", "none", 256),
])
def test_memory_estimate_matches_xla_for_scanned_t5_and_bert(name, remat, length):
    # A scanned stack's backward loop builds one layer's gradients (dprobs, dscores, ...; with
    # remat also the rebuilt layer) while every layer's stacked residuals are still alive. GPT's
    # loss buffers over all 128 positions are larger and hid that term; BERT's loss (19 scored
    # positions) and T5's (32 decoder positions) do not: without it the estimate was 0.84-0.93
    # of XLA's peak here, falling further as the scores grow with the length.
    c = with_(load_config(name), model__scan_layers=True, model__remat=remat,
              data__inputs_length=length)
    _check_memory(c)


@SLOW
@pytest.mark.parametrize("name,overrides,mesh", [
    ("t5_small", {}, (1, 1, 1)),
    ("gpt2_small", {"train__batch_size": 8}, (1, 1, 1)),
    ("t5_1_1_base", {"train__batch_size": 32}, (1, 1, 1)),
    ("gpt_1b", {"train__batch_size": 16}, (1, 8, 1)),
    ("tiny_t5", {}, (2, 1, 4)),
])
def test_memory_estimate_matches_xla_for_small_configs(name, overrides, mesh):
    _check_memory(with_(load_config(name), **overrides), mesh=mesh)


def test_cli_json_and_text(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "t5x_lite.estimate", "--config=configs/tiny_t5.py",
                          "--mesh=2,1,1", "--json", "--accelerators=tpu_v5e"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["model"]["params"] == 2_885_376 and r["run"]["rows_per_device"] == 8
    assert set(r["accelerators"]) == {"tpu_v5e"}
    bad = subprocess.run([sys.executable, "-m", "t5x_lite.estimate", "--config=configs/tiny_t5.py",
                          "--mesh=1,1,3"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
        "estimate: error: ")
    typo = subprocess.run([sys.executable, "-m", "t5x_lite.estimate",
                           "--config=configs/tiny_t5.py", "--config.model.d_modle=64"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert typo.returncode == 1 and typo.stderr.strip().splitlines()[-1] == (
        "estimate: error: unknown config key 'd_modle' in --config.model.d_modle; "
        "did you mean 'd_model'?"), typo.stderr[-2000:]


@pytest.mark.parametrize("kwargs, overrides, message", [
    ({"num_devices": 0}, {}, "--num_devices must be >= 1, got 0"),
    ({"num_devices": -8, "mesh": (1, -1, 1)}, {}, "--num_devices must be >= 1, got -8"),
    ({}, {"train__batch_size": 0}, "train.batch_size must be >= 1, got 0"),
    ({}, {"train__batch_size": -8}, "train.batch_size must be >= 1, got -8"),
    ({}, {"train__microbatches": 0}, "train.microbatches must be >= 1, got 0"),
    ({}, {"train__microbatches": 3}, "not divisible by train.microbatches=3"),
    ({}, {"train__num_steps": -1}, "train.num_steps must be >= 0"),
    ({}, {"data__seq_len": 0}, "data.seq_len must be >= 2, got 0"),
])
def test_nonpositive_numbers_are_refused_not_reported(kwargs, overrides, message):
    c = with_(load_config("tiny_gpt"), mesh__data=1, **overrides)  # batch 8
    with pytest.raises(estimate.EstimateError, match=message):
        estimate.estimate(c, **{"mesh": (1, 1, 1), **kwargs})


def test_cli_bad_numbers_and_extra_arguments_are_one_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args, message in [(["--num_devices=0"], "--num_devices must be >= 1, got 0"),
                          (["--mesh=1,-1,1", "--num_devices=-8"],
                           "--num_devices must be >= 1, got -8"),
                          (["stray"], "unexpected arguments ['stray']")]:
        r = subprocess.run([sys.executable, "-m", "t5x_lite.estimate",
                            "--config=configs/tiny_t5.py", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and not r.stdout, (r.stdout[-500:], r.stderr[-2000:])
        assert r.stderr.strip() == f"estimate: error: {message}", r.stderr[-2000:]


def test_memory_estimate_matches_xla_with_a_sliding_window():
    # Query blocks skip the keys before the window too: at length 512, window 32 and 8 blocks
    # the scores kept are 18% of the square, not the blocks' 9/16.
    c = with_(load_config("tiny_gpt"), data__seq_len=512, model__max_len=512,
              model__sliding_window=32, model__causal_blocks=8)
    assert em.causal_score_fraction(ModelConfig.from_dict(c.model), 512) == pytest.approx(
        (64 * 64 + 7 * 64 * 95) / 512 ** 2)
    _check_memory(c)
