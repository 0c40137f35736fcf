"""Training throughput and MFU on this machine, against the measured XLA matmul peak.

    python benchmarks/train_throughput.py                      # all models below
    python benchmarks/train_throughput.py --models=gpt_36m --steps=5 --profile_dir=/tmp/prof

MFU = model FLOPs per step (t5x_lite.training.flops) / step time / peak FLOP/s. On an
accelerator the peak comes from the table in flops.py; on CPU it is measured in the same run as
the speed of a large jitted float32 matmul (what XLA can reach on these cores). Batches are
synthetic (random ids, every position weighted) so the input pipeline is not measured; the step
is the trainer's (jitted once, state donated, Adafactor or AdamW).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from t5x_lite import config as model_config
from t5x_lite import partitioning
from t5x_lite.defaults import base_config
from t5x_lite.models import LossConfig, build_model
from t5x_lite.training import flops, optimizers, train_state, train_step

MODELS = {
    # name: (model config, batch, inputs/seq length, targets length)
    "tiny_t5": (model_config.t5_1_1(vocab_size=8192, d_model=128, num_heads=4, head_dim=32,
                                    d_ff=256, num_layers=2, num_decoder_layers=2), 16, 128, 32),
    "tiny_gpt": (model_config.gpt2(vocab_size=8192, d_model=128, num_heads=4, head_dim=32,
                                   d_ff=512, num_layers=2, max_len=256), 16, 128, None),
    "t5_26m": (model_config.t5_1_1(vocab_size=32128, d_model=256, num_heads=4, head_dim=64,
                                   d_ff=1024, num_layers=4, num_decoder_layers=4), 8, 512, 114),
    "gpt_36m": (model_config.gpt2(vocab_size=32128, d_model=512, num_heads=8, head_dim=64,
                                  d_ff=2048, num_layers=6, max_len=512), 8, 512, None),
}

_MODELS = flags.DEFINE_list("models", list(MODELS), f"Subset of {list(MODELS)}.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one compile + one warm-up step).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (bfloat16 on accelerators).")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adafactor", "adafactor | adamw")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy.")
_SCAN = flags.DEFINE_bool("scan_layers", False, "Scan over layers.")
_BATCH = flags.DEFINE_integer("batch", 0, "Override the batch size (0 = per-model default).")
_PROFILE = flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the timed steps.")
def matmul_peak(n: int = 2048, reps: int = 8) -> tuple[float, float]:
    """FLOP/s of a jitted n x n x n float32 matmul chain (the ceiling XLA reaches here), per
    wall second and per process-CPU second."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32) / n ** 0.5

    @jax.jit
    def chain(x):
        for _ in range(reps):
            x = x @ a
        return x

    chain(a).block_until_ready()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        chain(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return 2 * n ** 3 * reps / best, 2 * n ** 3 * reps / best_cpu


def synthetic_batch(family: str, b: int, length: int, targets: int | None):
    rng = np.random.default_rng(0)
    t = targets or length
    tgt = rng.integers(3, 8000, (b, t)).astype(np.int32)
    batch = {"decoder_target_tokens": tgt, "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
             "decoder_loss_weights": np.ones((b, t), np.float32)}
    if family == "t5":
        batch["encoder_input_tokens"] = rng.integers(3, 8000, (b, length)).astype(np.int32)
    return batch


def bench(name: str, peak: float | None, peak_cpu: float | None = None) -> dict:
    cfg, b, length, targets = MODELS[name]
    cfg = cfg.__class__(**{**cfg.to_dict(), "dtype": _DTYPE.value, "remat": _REMAT.value,
                           "scan_layers": _SCAN.value})
    b = _BATCH.value or b
    model = build_model(cfg, LossConfig())
    opt = base_config(cfg, objective="causal_lm").optimizer
    opt.name = _OPTIMIZER.value
    if opt.name == "adamw":
        opt.schedule = "cosine"
    tx, schedule = optimizers.make_optimizer(opt, 1000)
    mesh = partitioning.make_mesh()
    rules = partitioning.DEFAULT_RULES
    state, sh = train_state.create_train_state(model, tx, mesh, rules, jax.random.key(0))
    step = train_step.jit_train_step(train_step.make_train_step(model, tx, schedule), sh, mesh,
                                     rules)
    batch = jax.device_put(synthetic_batch(cfg.family, b, length, targets),
                           partitioning.data_sharding(mesh))
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    state, m = step(state, batch, rng)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = step(state, batch, rng)  # warm-up
    jax.block_until_ready(m)
    if _PROFILE.value:
        jax.profiler.start_trace(_PROFILE.value)
    times, cpu_times = [], []
    for _ in range(_STEPS.value):
        t, c = time.perf_counter(), time.process_time()
        state, m = step(state, batch, rng)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    if _PROFILE.value:
        jax.profiler.stop_trace()
    step_s = float(np.median(times))
    step_flops = flops.train_step_flops(cfg, b, length, targets)
    tokens = b * (length + (targets or 0))
    n_params = flops.param_count(state.params)
    return {"model": name, "params_M": n_params / 1e6, "batch": b, "length": length,
            "targets": targets, "compile_s": compile_s, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "model_TFLOP_per_step": step_flops / 1e12,
            "achieved_GFLOP_s": step_flops / step_s / 1e9,
            "mfu": step_flops / step_s / (peak * jax.device_count()) if peak else None,
            # On a shared CPU: FLOPs per process-CPU second against the matmul's, i.e. the MFU
            # this step would reach on idle cores if it kept them as busy as the matmul does.
            "mfu_cpu_time": (step_flops / float(np.median(cpu_times)) / peak_cpu
                             if peak_cpu else None),
            "loss": float(m["loss"])}


def main(argv):
    del argv
    kind = jax.devices()[0].device_kind
    peak = flops.peak_flops_per_device(kind)
    source, peak_cpu = "table", None
    if peak is None:
        (peak, peak_cpu), source = matmul_peak(), "measured f32 matmul"
    cpu_note = f", {peak_cpu / 1e9:.1f} per CPU-second" if peak_cpu else ""
    print(f"device: {kind} x{jax.device_count()}; peak {peak / 1e9:.1f} GFLOP/s per device "
          f"({source}{cpu_note}); dtype {_DTYPE.value}, optimizer {_OPTIMIZER.value}, remat "
          f"{_REMAT.value}, scan {_SCAN.value}")
    for name in _MODELS.value:
        r = bench(name, peak, peak_cpu)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        if r["mfu_cpu_time"] is not None:
            mfu += f" (by CPU time {100 * r['mfu_cpu_time']:.1f}%)"
        print(f"{r['model']:>9}: {r['params_M']:.1f}M params, batch {r['batch']} x "
              f"{r['length']}{'+' + str(r['targets']) if r['targets'] else ''}: "
              f"step {r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:.0f} tokens/s, "
              f"{r['achieved_GFLOP_s']:.1f} GFLOP/s, MFU {mfu} (compile {r['compile_s']:.1f} s)")


if __name__ == "__main__":
    app.run(main)
