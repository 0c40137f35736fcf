"""Training throughput and MFU on this machine, ours against Hugging Face PyTorch on the same run.

    python benchmarks/train_throughput.py                      # all models below, with --hf
    python benchmarks/train_throughput.py --models=gpt_36m --steps=5 --profile_dir=/tmp/prof
    python benchmarks/train_throughput.py --models=tiny_gpt --nohf --compile_compare

Ours: the trainer's step (jitted once, state donated) on a synthetic batch (random ids, every
position weighted, so the input pipeline is not measured). Compile time is
`jit(...).lower(...).compile()`; then one warm-up step and `--steps` timed steps, median. MFU =
model FLOPs per step (t5x_lite.training.flops.train_step_flops, forward + backward = 3x forward)
/ step time / peak FLOP/s. On an accelerator the peak comes from the table in flops.py (dense
bf16; --dtype defaults to bfloat16 there); on CPU it is measured in the same run as the best
time of a jitted 2048 x 2048 x 2048 float32 matmul chain (what XLA reaches on these cores;
--dtype defaults to float32 there), and the per-model line also gives MFU by process-CPU time
(what the step would reach on idle cores), since this machine is shared. A --dtype other
than the peak's (float32 against the bf16 table, bfloat16 against the measured f32 peak) puts
a WARNING line in the header: that MFU is not against the dtype's own peak.

--hf (default on; --nohf skips it; torch and transformers are imported only then): the same
architecture and size as a transformers PyTorch model built from a config (random weights, no
downloads): GPT2LMHeadModel(GPT2Config) for the gpt models and T5ForConditionalGeneration(
T5Config) v1.1 (gated-GELU, untied lm_head) for the t5 models, fp32, all dropouts 0,
attn_implementation="sdpa" (torch's fastest attention on CPU). It always runs on the CPU. A full
training step on the same batch: forward with labels (loss), backward, global-norm clipping to
1.0, torch.optim.AdamW(betas=(0.9, 0.95), eps=1e-8, weight_decay=0) step, zero_grad; at torch
thread counts 1 and torch.get_num_threads()'s default, each with one warm-up step and `--steps`
timed steps (median); the faster thread count is reported. With --hf our optimizer defaults to
adamw too (same clipping, betas, eps, no weight decay; only our learning-rate schedule differs,
which costs nothing), so both sides run the same update; --optimizer=adafactor overrides it
(without --hf the default stays adafactor). HF GFLOP/s = the same model FLOP count / HF step
time, also as a fraction of torch's peak, measured in the same run as the best time of a 2048^3
float32 torch.matmul chain at the same thread counts. ours/HF = our tokens/s / HF tokens/s.

--compile_compare (default off): per model, our compile time and step time unrolled vs
scan_layers=True (the run's own --scan_layers setting is reused, the other one is built too).

Output: one line per model as it finishes, then the header (device, both measured peaks, load
average at start and end, jax / torch / transformers versions), the compile table if asked, and
one markdown table: model | params | batch x len | step ms | tok/s | MFU | HF step ms | HF tok/s
| HF % of torch peak | ours/HF (the HF columns only with --hf). `batch x len` is
batch x inputs+targets length for t5, batch x length for gpt; tokens/s counts both.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from t5x_lite import config as model_config
from t5x_lite import convert
from t5x_lite import host_memory, partitioning
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
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after compile + one warm-up step).")
_DTYPE = flags.DEFINE_string(
    "dtype", None, "Compute dtype; default float32 on CPU, bfloat16 elsewhere (the peak of an "
    "accelerator comes from flops.py's dense bf16 table; another dtype is warned about).")
_OPTIMIZER = flags.DEFINE_string("optimizer", None,
                                 "adafactor | adamw; default adamw with --hf, else adafactor.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy.")
_SCAN = flags.DEFINE_bool("scan_layers", False, "Scan over layers.")
_BATCH = flags.DEFINE_integer("batch", 0, "Override the batch size (0 = per-model default).")
_PROFILE = flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the timed steps.")
_HF = flags.DEFINE_bool("hf", True, "Also time the same model in HF transformers (PyTorch, CPU).")
_COMPILE_COMPARE = flags.DEFINE_bool("compile_compare", False,
                                     "Also compile and time each model with the other "
                                     "scan_layers setting; print unrolled vs scanned.")
MATMUL_N, MATMUL_REPS = 2048, 8


def optimizer_name() -> str:
    return _OPTIMIZER.value or ("adamw" if _HF.value else "adafactor")


def timings(fn, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall and process-CPU seconds of n calls of fn (which must block until done)."""
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return np.array(wall), np.array(cpu)


def matmul_peak(n: int = MATMUL_N, reps: int = MATMUL_REPS) -> tuple[float, float]:
    """FLOP/s of a jitted n x n x n float32 matmul chain (the ceiling XLA reaches here), per
    wall second and per process-CPU second."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32) / n ** 0.5

    @jax.jit
    def chain(x):
        for _ in range(reps):
            x = x @ a
        return x

    chain(a).block_until_ready()
    wall, cpu = timings(lambda: chain(a).block_until_ready(), 3)
    return 2 * n ** 3 * reps / wall.min(), 2 * n ** 3 * reps / cpu.min()


def synthetic_batch(family: str, b: int, length: int, targets: int | None):
    rng = np.random.default_rng(0)
    t = targets or length
    tgt = rng.integers(3, 8000, (b, t)).astype(np.int32)
    batch = {"decoder_target_tokens": tgt, "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
             "decoder_loss_weights": np.ones((b, t), np.float32)}
    if family == "t5":
        batch["encoder_input_tokens"] = rng.integers(3, 8000, (b, length)).astype(np.int32)
    return batch


def compute_dtype() -> str:
    """--dtype, or by default float32 on CPU and bfloat16 on accelerators."""
    return _DTYPE.value or ("float32" if jax.default_backend() == "cpu" else "bfloat16")


def peak_warning(peak_source: str, dtype: str) -> str | None:
    """A header line when the peak MFU divides by is not one of the compute dtype: the
    flops.py table's dense bf16 peak (`peak_source` "table"), or the float32 matmul measured
    in the run ("measured")."""
    peak_dtype = "bfloat16" if peak_source == "table" else "float32"
    if dtype == peak_dtype:
        return None
    return (f"WARNING: compute dtype {dtype} but the peak is the {peak_dtype} one ("
            f"{'flops.py table' if peak_source == 'table' else 'measured in this run'}): the "
            f"MFU below is against a {peak_dtype} peak, not a {dtype} one")


def model_setup(name: str, scan: bool):
    """(model config with this run's dtype / remat / scan, batch size, length, targets)."""
    cfg, b, length, targets = MODELS[name]
    cfg = cfg.__class__(**{**cfg.to_dict(), "dtype": compute_dtype(), "remat": _REMAT.value,
                           "scan_layers": scan})
    return cfg, _BATCH.value or b, length, targets


def bench(name: str, peak: float | None, peak_cpu: float | None = None,
          scan: bool | None = None) -> dict:
    scan = _SCAN.value if scan is None else scan
    cfg, b, length, targets = model_setup(name, scan)
    model = build_model(cfg, LossConfig())
    opt = base_config(cfg, objective="causal_lm").optimizer
    opt.name = optimizer_name()
    if opt.name == "adamw":
        opt.schedule = "cosine"
    tx, schedule = optimizers.make_optimizer(opt, 1000)
    mesh = partitioning.make_mesh()
    rules = partitioning.DEFAULT_RULES
    state, sh = train_state.create_train_state(model, tx, mesh, rules, jax.random.key(0))
    jitted = train_step.jit_train_step(train_step.make_train_step(model, tx, schedule), sh, mesh,
                                       rules).jitted
    batch = jax.device_put(synthetic_batch(cfg.family, b, length, targets),
                           partitioning.data_sharding(mesh))
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    with partitioning.activate(mesh, rules):
        step = jitted.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    m = None

    def run():
        nonlocal state, m
        state, m = step(state, batch, rng)
        jax.block_until_ready(m)

    run()  # warm-up
    if _PROFILE.value:
        jax.profiler.start_trace(_PROFILE.value)
    times, cpu_times = timings(run, _STEPS.value)
    if _PROFILE.value:
        jax.profiler.stop_trace()
    step_s = float(np.median(times))
    step_flops = flops.train_step_flops(cfg, b, length, targets)
    return {"model": name, "scan": scan, "params_M": flops.param_count(state.params) / 1e6,
            "batch": b, "length": length, "targets": targets, "compile_s": compile_s,
            "step_s": step_s, "tokens": b * (length + (targets or 0)), "step_flops": step_flops,
            "mfu": step_flops / step_s / (peak * jax.device_count()) if peak else None,
            # On a shared CPU: FLOPs per process-CPU second against the matmul's, i.e. the MFU
            # this step would reach on idle cores if it kept them as busy as the matmul does.
            "mfu_cpu_time": (step_flops / float(np.median(cpu_times)) / peak_cpu
                             if peak_cpu else None),
            "loss": float(m["loss"])}


# --- Hugging Face transformers (PyTorch), imported only with --hf ---------------------------

@functools.cache
def torch_thread_counts() -> tuple[int, ...]:
    """1 and torch's default thread count (read once, before anything changes it)."""
    import torch
    return tuple(sorted({1, torch.get_num_threads()}))


def torch_best(fn, n: int, reduce=np.median) -> tuple[float, int]:
    """(best over torch thread counts of reduce(wall times of n calls after one warm-up),
    the thread count that reached it); torch's default thread count is restored after."""
    import torch
    best = (float("inf"), 0)
    for threads in torch_thread_counts():
        torch.set_num_threads(threads)
        fn()
        best = min(best, (float(reduce(timings(fn, n)[0])), threads))
    torch.set_num_threads(torch_thread_counts()[-1])
    return best


def torch_matmul_peak(n: int = MATMUL_N, reps: int = MATMUL_REPS) -> tuple[float, int]:
    """(FLOP/s, threads) of the best of 3 float32 torch.matmul chains, as matmul_peak."""
    import torch
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)) / n ** 0.5

    def chain():
        x = a
        for _ in range(reps):
            x = x @ a
        return x

    best_s, threads = torch_best(chain, 3, reduce=np.min)
    return 2 * n ** 3 * reps / best_s, threads


def hf_model(cfg: model_config.ModelConfig):
    """The transformers model of the same architecture and size (fp32, random, sdpa), from the
    HF config our exporter writes for `cfg` (t5x_lite.convert.hf_config_from_model)."""
    import torch
    import transformers
    torch.manual_seed(0)
    hf_cfg = convert.hf_config_from_model(cfg)
    config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    auto = (transformers.AutoModelForCausalLM if cfg.family == "gpt"
            else transformers.AutoModelForSeq2SeqLM)
    model = auto.from_config(config, attn_implementation="sdpa")
    if cfg.family == "t5" and not cfg.tie_embeddings:
        # transformers 5.x ties T5's lm_head to the embedding whatever the config says: untie.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))
    return model


def hf_bench(name: str) -> dict:
    """Step time of a full HF training step (AdamW, fp32) on the same batch as ours."""
    import torch
    cfg, b, length, targets = model_setup(name, False)
    model = hf_model(cfg).train()
    batch = {k: torch.from_numpy(v).long()
             for k, v in synthetic_batch(cfg.family, b, length, targets).items()}
    if cfg.family == "gpt":  # GPT2LMHeadModel shifts the labels itself
        inputs = dict(input_ids=batch["decoder_target_tokens"],
                      labels=batch["decoder_target_tokens"])
    else:
        inputs = dict(input_ids=batch["encoder_input_tokens"],
                      decoder_input_ids=batch["decoder_input_tokens"],
                      labels=batch["decoder_target_tokens"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0)

    def step():
        model(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s, threads = torch_best(step, _STEPS.value)
    return {"hf_step_s": step_s, "hf_threads": threads,
            "hf_params_M": sum(p.numel() for p in model.parameters()) / 1e6}


# --- output ----------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def shape(r: dict) -> str:
    return f"{r['batch']} x {r['length']}{'+' + str(r['targets']) if r['targets'] else ''}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def main(argv):
    del argv
    load_start = os.getloadavg()
    kind = jax.devices()[0].device_kind
    dtype, peak = compute_dtype(), flops.peak_flops_per_device(kind)
    source, peak_cpu, warning = "flops.py table, dense bf16", None, peak_warning("table", dtype)
    if peak is None:
        (peak, peak_cpu), source = matmul_peak(), f"measured f32 {MATMUL_N}^3 jitted matmul"
        warning = peak_warning("measured", dtype)
    cpu_note = f", {peak_cpu / 1e9:.1f} per CPU-second" if peak_cpu else ""
    header = [f"device: {kind} x{jax.device_count()}; jax {jax.__version__}; dtype {dtype}, "
              f"optimizer {optimizer_name()}, remat {_REMAT.value}, scan {_SCAN.value}, "
              f"{_STEPS.value} timed steps (median)",
              f"jax peak: {peak / 1e9:.1f} GFLOP/s per device ({source}{cpu_note})",
              host_memory.status()]
    if warning:
        header.insert(2, warning)
    if _HF.value:
        import torch
        import transformers
        transformers.logging.set_verbosity_error()
        torch_peak, peak_threads = torch_matmul_peak()
        header.append(f"torch peak: {torch_peak / 1e9:.1f} GFLOP/s (f32 {MATMUL_N}^3 torch.matmul "
                      f"on CPU, best of threads {torch_thread_counts()} at {peak_threads}); torch "
                      f"{torch.__version__}, transformers {transformers.__version__}; HF side: "
                      f"sdpa attention, fp32, AdamW")
    print("\n".join(header), flush=True)

    results = []
    for name in _MODELS.value:
        r = bench(name, peak, peak_cpu)
        mfu = pct(r["mfu"])
        if r["mfu_cpu_time"] is not None:
            mfu += f" (by CPU time {pct(r['mfu_cpu_time'])})"
        print(f"{name:>9}: {r['params_M']:.1f}M params, batch {shape(r)}: "
              f"step {ms(r['step_s'])} ms, {r['tokens'] / r['step_s']:.0f} tokens/s, "
              f"{r['step_flops'] / r['step_s'] / 1e9:.1f} GFLOP/s, MFU {mfu} "
              f"(compile {r['compile_s']:.1f} s, loss {r['loss']:.3f})", flush=True)
        if _COMPILE_COMPARE.value:
            other = bench(name, peak, peak_cpu, scan=not r["scan"])
            r["by_scan"] = {r["scan"]: r, other["scan"]: other}
            print(f"{'':>9}  scan_layers={other['scan']}: compile {other['compile_s']:.1f} s, "
                  f"step {ms(other['step_s'])} ms", flush=True)
        if _HF.value:
            r.update(hf_bench(name))
            print(f"{'':>9}  HF: {r['hf_params_M']:.1f}M params, step "
                  f"{ms(r['hf_step_s'])} ms at {r['hf_threads']} torch threads, "
                  f"{r['tokens'] / r['hf_step_s']:.0f} tokens/s, "
                  f"{r['step_flops'] / r['hf_step_s'] / 1e9:.1f} GFLOP/s", flush=True)
        results.append(r)

    load_end = os.getloadavg()
    print("\n" + "\n".join(header))
    print("load average (1/5/15 min): start " + " ".join(f"{x:.2f}" for x in load_start)
          + ", end " + " ".join(f"{x:.2f}" for x in load_end))
    if _COMPILE_COMPARE.value:
        print("\n" + markdown_table(
            ["model", "unrolled compile s", "scanned compile s", "unrolled step ms",
             "scanned step ms"],
            [[r["model"], *(f"{r['by_scan'][s]['compile_s']:.1f}" for s in (False, True)),
              *(ms(r['by_scan'][s]['step_s']) for s in (False, True))]
             for r in results]))
    cols = ["model", "params", "batch x len", "step ms", "tok/s", "MFU"]
    if _HF.value:
        cols += ["HF step ms", "HF tok/s", "HF % of torch peak", "ours/HF"]
    rows = []
    for r in results:
        row = [r["model"], f"{r['params_M']:.1f}M", shape(r), ms(r['step_s']),
               f"{r['tokens'] / r['step_s']:.0f}", pct(r["mfu"])]
        if _HF.value:
            row += [ms(r['hf_step_s']), f"{r['tokens'] / r['hf_step_s']:.0f}",
                    pct(r["step_flops"] / r["hf_step_s"] / torch_peak),
                    f"{r['hf_step_s'] / r['step_s']:.2f}x"]
        rows.append(row)
    print("\n" + markdown_table(cols, rows))


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    app.run(main)
