"""Decode speed: KV-cached vs uncached, against HF PyTorch `generate`, the memory roofline,
and speculative decoding's speed-up. Run by hand; prints a markdown table.

    python benchmarks/decode_speed.py                          # GPT ~36M and T5 ~70M, batch 1, 16
    python benchmarks/decode_speed.py --models=gpt --batch_sizes=1 --new_tokens=64 --skip_hf
    python benchmarks/decode_speed.py --compile_compare --skip_hf --nospeculative --new_tokens=64
    python benchmarks/decode_speed.py --models= --nospeculative --kv_heads=8,2,1  # GQA / MQA
    python benchmarks/decode_speed.py --models=gpt --skip_hf --nospeculative --processors
    python benchmarks/decode_speed.py --models=gpt --batch_sizes= --skip_hf --prompt_lookup=4,10

Models: GPT-2-style, d_model 512, 6 layers, 8 heads, d_ff 2048, vocab 32128, 1024 positions
(35.9M params, tied head; 35.6M with train_throughput.py's 512 positions); T5 v1.1-style,
d_model 512, 6+6 layers, 8 heads, d_ff 1024, vocab 32128 (~70M, untied).
Weights are random (HF's own init), built as HF PyTorch models and converted with
t5x_lite.hf_interop, so both sides run the very same float32 weights. Prompts: random ids,
--prompt_len tokens. Greedy; rows do not stop early (EOS is suppressed in HF with
min_new_tokens; ours counts the steps it actually ran).

Columns:
  prefill   the jitted prompt pass alone (GPT: the prompt into a fresh cache; T5: the encoder
            plus the decoder start token), best of runs.
  ms/token  (cached time - prefill) / (tokens - 1): the latency of one cached decode step.
  cached    t5x_lite generate: one jitted lax.while_loop, prefill + one token per step; one
            full-length warm-up run (compiles), then the best of --repeats runs.
  uncached  re-running the full forward pass for every new token with no cache, for a
            sequence growing from prompt_len to prompt_len + new_tokens: timed at the average
            length (prompt_len + new_tokens / 2; jitted, fixed shape) and multiplied by
            new_tokens (the cost of a step is ~linear in length at these sizes). T5 re-runs the
            encoder as well.
  HF        transformers `generate(do_sample=False, use_cache=True)` on the same weights, timed
            as cached is: per torch thread count (1 and all), one full-length warm-up run, then
            the best of --repeats runs; the faster thread count.
  paired    ours / HF in --hf_rounds rounds of one decode of ours and one HF generate at
            that thread count, in alternating order (`paired_hf_ratios`): median [min-max].
            HF's rate moves within minutes on a shared VM; a round compares the two sides in
            the same minute.
  roofline  batch 1: float32 bytes a decode step reads per token divided by the memory
            bandwidth measured beside it, in --roofline_rounds paired rounds (the probes, then
            one cached decode run: `paired_roofline_shares`); the table gives the median round
            and the range, and a line after it the spread of the probe and the decode rate.
            Bytes (`bytes_per_token`): the weights the step
            reads (not T5's encoder, nor its decoder's cross-attention key / value kernels,
            whose K/V the prefill caches; one row of an untied or position embedding) + the KV
            cache at the average length (T5: + the cross-attention K/V of the prompt).
            Bandwidth: the read rate, a jitted sum over a 512 MiB array (a decode step only
            reads its weights); "% of roofline" also gives the share of the copy roofline, a
            jitted in-place copy of the array counted as (read + write bytes) / time, which is
            higher (~55 against ~33 GB/s on the 2-core EPYC VM: the write stream adds to the
            reads). A jitted max, a 2-row sum and numpy sums on two threads read at 29-33 GB/s
            there too; one thread reads ~25.
--compile_compare (default off): per model, the compile time (`lower(...).compile()`) of the
two jitted decode programs, greedy (`_sample_jit`: prefill + the cached while loop) and beam
search (`_beam_jit`, 4 beams, alpha 0.6), with unrolled and with scanned layers (the same
weights stacked), and the run time of each compiled program per new token (prefill included),
at the first of --batch_sizes; the outputs of the two layouts are checked equal. The training
step's compile times are in benchmarks/train_throughput.py --compile_compare.
Speculative: greedy, draft = the target's first --draft_layers layers sharing its embeddings
and head ("self-speculative"), num_draft tokens per target pass; outputs are checked equal to
plain greedy. Targets: the 36M GPT, whose tied 16.4M-parameter head dominates (so any draft
with the same vocabulary costs half a target step), and a deeper GPT of the same width
(--deep_layers, random GPT-2 init) where a 1-layer draft is cheap. Random GPT-2-init weights
leave the residual stream dominated by the embeddings, so shallow drafts agree often; a trained
model's acceptance is what decides the real gain.
--processors (default off): also times cached greedy decoding of each model with HF's sequence
processors on (repetition_penalty 1.2, no_repeat_ngram_size 3, min_new_tokens = new_tokens / 2:
README "Exact semantics"), and with four stop strings (`STOP_STRINGS`, over a stand-in
vocabulary of random lowercase words that never completes them, so rows run to the end),
against the same decode with both off, per --batch_sizes, in alternating runs; and the host
time to build the stop strings' tables for the vocabulary.
--prompt_lookup (default none): also times greedy prompt lookup decoding (HF's
prompt_lookup_num_tokens: proposals copied from the row itself, no draft model) of the 36M GPT
at batch 1 with each of these proposal counts, against plain greedy decoding, and checks the
outputs equal. Random weights: what it accepts comes from the random model repeating itself,
not from copying its prompt as a trained model does on extraction or summaries.
--kv_heads (default none): also times cached decoding (ours only: GPT-2 has no grouped-query
form) of a gpt_modern of the same width (8 heads, d_ff 1408, 6 layers, untied head; random
N(0, 1/fan_in) weights) with each of these key / value head counts, at --batch_sizes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from t5x_lite import hf_interop, host_memory, transformer
from t5x_lite.decoding import compiler
from t5x_lite.decoding import generate as gen
from t5x_lite.decoding import steps as dec_steps
from t5x_lite.decoding import stop_strings
from t5x_lite.models import build_model

_MODELS = flags.DEFINE_list("models", ["gpt", "t5"], "gpt and/or t5")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Tokens generated per row.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Skip the HF PyTorch comparison.")
_SPEC = flags.DEFINE_bool("speculative", True, "Measure speculative decoding (GPT).")
_DRAFT_LAYERS = flags.DEFINE_integer("draft_layers", 1, "Target layers used as the draft.")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 4, "Draft tokens per target pass.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 2, "Timed runs after one full-length warm-up run, the best reported: for ours "
    "and for HF alike (HF: per torch thread count, then the faster count).")
_HF_ROUNDS = flags.DEFINE_integer(
    "hf_rounds", 5, "Paired rounds per row of one decode of ours and one HF generate "
    "(the ours / HF median and range); 0 = none.", lower_bound=0)
_ROUNDS = flags.DEFINE_integer(
    "roofline_rounds", 7, "Batch 1: paired rounds of (bandwidth probes, one cached decode run) "
    "for the roofline shares (`paired_roofline_shares`).")
_DEEP = flags.DEFINE_integer("deep_layers", 24, "Layers of the deeper speculative target.")
_KV_HEADS = flags.DEFINE_list("kv_heads", [], "gpt_modern key / value head counts to time.")
_LOOKUP = flags.DEFINE_list("prompt_lookup", [], "Also time prompt lookup decoding of the 36M "
                            "GPT with these prompt_lookup_num_tokens values (see docstring).")
_PROCESSORS = flags.DEFINE_bool("processors", False, "Time greedy decoding with HF's sequence "
                                "processors on against off (see the module docstring).")
_COMPILE_COMPARE = flags.DEFINE_bool(
    "compile_compare", False, "Compile time and ms/token of the greedy and beam programs, "
    "unrolled vs scanned layers (see the module docstring).")

V = 32128


def _best_time(fn, repeats):
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _loaded(hf_model):
    tensors = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    cfg = hf_interop.model_config_from_hf(hf_model.config.to_dict(), tensors)
    cfg = dataclasses.replace(cfg, dropout_rate=0.0)
    params = jax.device_put(hf_interop.params_from_hf(cfg, tensors))
    return types.SimpleNamespace(model=build_model(cfg), params=params, vocab=None,
                                 run_config=None)


def build(kind: str):
    import torch
    import transformers
    torch.manual_seed(0)
    if kind == "gpt":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=512, n_layer=6, n_head=8, n_inner=2048,
                                      n_positions=1024, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                      bos_token_id=1, eos_token_id=1, pad_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.T5Config(vocab_size=V, d_model=512, d_kv=64, d_ff=1024, num_layers=6,
                                    num_decoder_layers=6, num_heads=8, dropout_rate=0.0,
                                    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = transformers.T5ForConditionalGeneration(cfg)
        g = torch.Generator().manual_seed(1)  # transformers 5 ties T5 heads: untie (v1.1)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 512, generator=g) * 512**-0.5)
    return model.eval(), _loaded(model)


def _prompts(batch, length, seed=0):
    return np.random.default_rng(seed).integers(2, V, (batch, length)).astype(np.int32)


def cached_run(loaded, prompts, n, **decode):
    """(run, steps): `run()` decodes the batch once (greedy, `n` new tokens) and waits for it;
    `steps()` is the number of steps the last run took."""
    cfg = loaded.model.config
    tokens, lengths = gen.pack_prompts(cfg, prompts.tolist(), len(prompts))
    opts = gen.DecodeOptions(max_new_tokens=n, batch_size=len(prompts), **decode)
    out = {}

    def run():
        out["r"] = gen.decode_batch(loaded, tokens, lengths, opts)
        jax.block_until_ready(out["r"])

    return run, lambda: int(np.max(np.asarray(out["r"].lengths_B)))


def time_cached(loaded, prompts, n, **decode):
    run, steps = cached_run(loaded, prompts, n, **decode)
    t = _best_time(run, _REPEATS.value)
    return t, steps()


def time_prefill(loaded, prompts, n):
    """The prompt pass alone (T5: the encoder + the start token), into the cache the decode's
    prefill fills: its first phase (`gen.cache_phases`)."""
    cfg = loaded.model.config
    tokens, lengths = gen.pack_prompts(cfg, prompts.tolist(), len(prompts))
    cache_len = gen.cache_phases(cfg, tokens.shape[1], n)[0]
    run = jax.jit(lambda params: dec_steps.prefill(cfg, params, tokens, lengths, cache_len)[:2])
    return _best_time(lambda: jax.block_until_ready(run(loaded.params)), _REPEATS.value + 1)


def time_uncached(loaded, prompts, n):
    cfg, model = loaded.model.config, loaded.model
    b, p = prompts.shape
    length = p + n // 2
    buf = np.random.default_rng(1).integers(2, V, (b, length)).astype(np.int32)
    if cfg.family == "gpt":
        batch = {"decoder_input_tokens": buf}
    else:
        dec = np.random.default_rng(2).integers(2, V, (b, 1 + n // 2)).astype(np.int32)
        batch = {"encoder_input_tokens": prompts, "decoder_input_tokens": dec}

    @jax.jit
    def step(params, batch):  # the full forward, then the greedy pick at the last position
        return jnp.argmax(model.logits(params, batch)[:, -1], -1)

    return _best_time(lambda: step(loaded.params, batch).block_until_ready(), 2) * n


def _hf_generate(hf_model, prompts, n):
    """One HF greedy `generate` of `n` new tokens per row (EOS held off), as a function."""
    import torch
    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
              pad_token_id=0)

    def run():
        with torch.no_grad():
            hf_model.generate(ids, **kw)

    return run


def time_hf(hf_model, prompts, n):
    """Timed as `time_cached` is (`_best_time`): per torch thread count (1 and all), one
    full-length warm-up run, then the best of --repeats runs; the minimum over the thread
    counts. On a busy machine, torch's OpenMP threads can be several times slower with 2
    threads than with 1, which would flatter the comparison. Returns (seconds, the thread
    count that gave them)."""
    import torch
    run = _hf_generate(hf_model, prompts, n)
    best = (float("inf"), torch.get_num_threads())
    for threads in sorted({1, best[1]}):
        with _torch_threads(threads):
            best = min(best, (_best_time(run, _REPEATS.value), threads))
    return best


@contextlib.contextmanager
def _torch_threads(threads: int):
    """torch's intra-op thread count set to `threads` inside, the previous count restored."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def paired_hf_ratios(loaded, hf_model, prompts, n, threads, rounds):
    """ours / HF tokens per second, one pair per round: one cached decode of ours and one HF
    `generate` at `threads` torch threads (the faster count in `time_hf`), ours first in even
    rounds and HF first in odd ones (neither side always runs right after the other); both
    sides are warm already. HF's rate on the shared VM moves within minutes (batch 16: 429,
    394, 407 tok/s in consecutive runs), so a ratio of two best-of times taken minutes apart is
    partly a draw of the minute; the table also gives the median and range of the rounds."""
    if rounds <= 0:
        return []
    run, steps = cached_run(loaded, prompts, n)
    run()
    hf_run = _hf_generate(hf_model, prompts, n)
    out = []
    with _torch_threads(threads):
        for i in range(rounds):
            seconds = {}
            for side, fn in (("ours", run), ("hf", hf_run))[::1 if i % 2 == 0 else -1]:
                t = time.perf_counter()
                fn()
                seconds[side] = time.perf_counter() - t
            out.append((steps() / seconds["ours"]) / (n / seconds["hf"]))
    return out


def ratio_cell(ratios) -> str:
    """`paired_hf_ratios`' rounds as the table's cell: median [min-max]."""
    return _median_range(ratios, "{:.2f}", "x") if len(ratios) else "-"


def _median_range(values, fmt: str, unit: str) -> str:
    """`values` as "median<unit> [min-max]", each number written with `fmt`."""
    v = np.asarray(values)
    return f"{fmt.format(np.median(v))}{unit} [{fmt.format(v.min())}-{fmt.format(v.max())}]"


HALT_POLL = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


def idle_polling(path: str = HALT_POLL) -> str:
    """Header words on how long an idle vCPU of this guest polls before it halts (Linux
    cpuidle-haltpoll, on KVM guests; README "The join delay is a halted vCPU"). At 0 every
    pool thread that parks between two products halts its vCPU, and waking it takes ~40-55 us
    on the development VM."""
    try:
        with open(path, encoding="ascii") as f:
            ns = int(f.read().strip())
    except (OSError, ValueError):
        return "guest halt polling: n/a"
    if ns == 0:
        return "guest halt polling: off (0 ns; idle vCPUs halt at once, see README)"
    return f"guest halt polling: {ns} ns"


def memory_bandwidth(repeats=5):
    """Bytes/s of (a) reading a 512 MiB array (a jitted sum: what decoding does with weights)
    and (b) copying it in place (donated: no fresh pages to fault in), read + write bytes;
    best of `repeats` each."""
    x = jnp.ones((128 * 2**20,), jnp.float32)
    read = jax.jit(jnp.sum)
    t_read = _best_time(lambda: read(x).block_until_ready(), repeats)
    copy = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    state = {"x": x}

    def run():
        state["x"] = copy(state["x"])
        state["x"].block_until_ready()

    t_copy = _best_time(run, repeats)
    return x.nbytes / t_read, 2 * x.nbytes / t_copy


def paired_roofline_shares(loaded, prompts, n, step_bytes, rounds):
    """Shares of the batch-1 read and copy rooflines, one pair per round: the probes
    (`memory_bandwidth`, best of 3), then one cached decode run right after them. The shared
    VM's bandwidth moves within minutes (read 24-38 GB/s between consecutive probes) while
    the decode rate moves far less, so a share taken against one probe at the start of the run
    is a draw; the table gives the median round and the range. Returns one (tok/s, read
    bytes/s, copy bytes/s) per round."""
    run, steps = cached_run(loaded, prompts, n)
    run()  # compiled already by the main table; warm
    out = []
    for _ in range(rounds):
        bw, bw_copy = memory_bandwidth(3)
        t = time.perf_counter()
        run()
        out.append((steps() / (time.perf_counter() - t), bw, bw_copy))
    return out


def roofline_cells(rounds, step_bytes) -> tuple[str, str]:
    """The table's batch-1 cells from `paired_roofline_shares`' rounds: the median roofline
    (read bandwidth / step bytes) and the shares of the read and copy rooflines, median
    [min-max] over the rounds."""
    tps, bw, bw_copy = (np.array(x) for x in zip(*rounds))

    def share(b):
        return _median_range(100 * tps * step_bytes / b, "{:.0f}", "%")

    return f"{np.median(bw) / step_bytes:.1f}", f"{share(bw)} / {share(bw_copy)}"


def _gathered(cfg) -> tuple:
    """Top-level params a decode step reads one row of (a lookup), not the whole array."""
    tables = ("position_embedder",) if cfg.family == "gpt" else ()
    return tables if cfg.tie_embeddings else tables + ("token_embedder",)


def step_weights(cfg, params) -> dict:
    """{path: leaf} of the params a cached decode step reads in full, scanned or unrolled.

    Not read: T5's encoder (run once, in the prefill) and each decoder layer's cross-attention
    key and value kernels (the prefill projects the encoder output once and caches it); one row
    of the token (and GPT's position) embedding, unless the token embedding is the tied head.
    """
    skip = set(_gathered(cfg)) | {"encoder", "encoder_norm", "encoder_relpos"}
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", k) for k in path]
        if keys[0] in skip or ("cross_attention" in keys and keys[-1] in ("key", "value")):
            continue
        out[jax.tree_util.keystr(path)] = leaf
    return out


def bytes_per_token(loaded, avg_len, prompt_len):
    """float32 bytes a batch-1 decode step reads: the weights it reads (`step_weights`) + the
    KV cache, `avg_len` self-attention slots (+ T5's cross-attention K/V of a `prompt_len`
    encoder input)."""
    cfg = loaded.model.config
    touched = sum(x.size for x in step_weights(cfg, loaded.params).values())
    layers = cfg.num_layers if cfg.family == "gpt" else cfg.decoder_layers
    kv = 2 * layers * avg_len * cfg.kv_heads * cfg.head_dim
    if cfg.family == "t5":
        kv += 2 * layers * prompt_len * cfg.num_heads * cfg.head_dim  # cross-attention K/V
    return 4 * (touched + kv)


def scanned(loaded):
    """The same model and weights with scan_layers=True (layers stacked on a leading axis)."""
    cfg = dataclasses.replace(loaded.model.config, scan_layers=True)
    params = jax.device_put(transformer.stack_layers(jax.device_get(loaded.params)))
    return types.SimpleNamespace(model=build_model(cfg), params=params, vocab=None,
                                 run_config=None)


def decode_program(cfg, params, prompts, n, method):
    """(jitted decode program, its arguments, its static arguments) for `method` "greedy"
    (`_sample_jit`) or "beam" (`_beam_jit`, the default 4 beams) over `prompts`."""
    tokens, lengths = gen.pack_prompts(cfg, prompts.tolist(), len(prompts))
    opts = gen.DecodeOptions(method=method, max_new_tokens=n, batch_size=len(prompts))
    if method == "beam":
        return (gen._beam_jit, (params, tokens, lengths),
                dict(cfg=cfg, n=n, beams=opts.num_beams, rule=opts.beam))
    example_b = np.arange(len(prompts), dtype=np.int32)
    return (gen._sample_jit, (params, tokens, lengths, np.uint32(0), example_b),
            dict(cfg=cfg, n=n, sampling=opts.sampling, samples=1))


def compile_and_run(loaded, prompts, n, method):
    """(compile seconds, best run seconds, tokens) of one jitted decode program, the params as
    stored (a scanned stack is unrolled inside the program)."""
    fn, args, static = decode_program(loaded.model.config, loaded.params, prompts, n, method)
    jax.clear_caches()  # the main table compiled the same programs already
    t = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    t_compile = time.perf_counter() - t
    out = {}

    def run():
        out["r"] = jax.block_until_ready(compiled(*args))

    t_run = _best_time(run, _REPEATS.value)
    return t_compile, t_run, np.asarray(out["r"][0])


def compile_compare(built, n):
    b = int(_BATCHES.value[0])
    print(f"\ncompile time of the jitted decode programs, unrolled vs scanned layers (batch {b}, "
          f"{_PROMPT.value}-token prompts, {n} new tokens; ms/token = run time / {n}, prefill "
          "included):")
    print("| model | program | unrolled compile s | scanned compile s | unrolled ms/token | "
          "scanned ms/token | same output |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for kind, (_, loaded) in built.items():
        prompts = _prompts(b, _PROMPT.value)
        stacked = scanned(loaded)
        for method in ("greedy", "beam"):
            c_u, t_u, out_u = compile_and_run(loaded, prompts, n, method)
            c_s, t_s, out_s = compile_and_run(stacked, prompts, n, method)
            print(f"| {kind} | {method} | {c_u:.1f} | {c_s:.1f} | {1e3 * t_u / n:.2f} | "
                  f"{1e3 * t_s / n:.2f} | {np.array_equal(out_u, out_s)} |", flush=True)


def first_layers_draft(target, layers: int):
    """A draft made of the target's first `layers` layers, sharing its embeddings and head."""
    cfg = target.model.config
    dcfg = dataclasses.replace(cfg, num_layers=layers)
    dparams = {k: v for k, v in target.params.items() if k != "decoder"}
    if cfg.scan_layers:
        block = target.params["decoder"]["layers"]["block"]
        dparams["decoder"] = {"layers": {"block": jax.tree.map(lambda x: x[:layers], block)}}
    else:
        dparams["decoder"] = {f"layers_{i}": target.params["decoder"][f"layers_{i}"]
                              for i in range(layers)}
    return types.SimpleNamespace(model=build_model(dcfg), params=dparams, vocab=None,
                                 run_config=None)


def _random_loaded(cfg, draw):
    """A `t5x_lite.load`-like model of `cfg` whose params `draw(name, shape)` gives (numpy)."""
    from t5x_lite.models import abstract_variables
    import flax.linen as nn
    abstract = nn.meta.unbox(abstract_variables(build_model(cfg)))["params"]
    params = jax.device_put(  # jax arrays, as `load` gives: the decode layout is kept
        jax.tree_util.tree_map_with_path(lambda p, x: draw(p[-1].key, x.shape), abstract))
    return types.SimpleNamespace(model=build_model(cfg), params=params, vocab=None,
                                 run_config=None)


def deep_gpt(layers: int):
    """A deeper GPT of the same width (scanned to keep compiling fast), GPT-2's init."""
    from t5x_lite import config as config_lib
    cfg = config_lib.gpt2(vocab_size=V, d_model=512, num_heads=8, head_dim=64, d_ff=2048,
                          num_layers=layers, max_len=1024, scan_layers=True)
    rng = np.random.default_rng(0)

    def draw(name, shape):
        if name == "scale":
            return np.ones(shape, np.float32)
        if name.endswith("bias"):
            return np.zeros(shape, np.float32)
        # GPT-2 scales the residual output projections by 1/sqrt(2 * layers).
        std = 0.02 / np.sqrt(2 * layers) if name in ("out", "wo") else 0.02
        return (std * rng.standard_normal(shape)).astype(np.float32)

    loaded = _random_loaded(cfg, draw)
    loaded.params = jax.device_put(loaded.params)
    return loaded


def speculative(target, draft, n, **lookup):
    """(plain s, speculative s, accepted proposals per pass, same output) of greedy batch-1
    decoding with `draft`, or with draft None and `lookup` options, prompt lookup."""
    cfg = target.model.config
    prompts = _prompts(1, _PROMPT.value)
    tokens, lengths = gen.pack_prompts(cfg, prompts.tolist(), 1)
    opts = gen.DecodeOptions(max_new_tokens=n, batch_size=1, num_draft=_NUM_DRAFT.value,
                             **lookup)
    res = {}

    def plain():
        res["plain"] = gen.decode_batch(target, tokens, lengths,
                                        dataclasses.replace(opts, prompt_lookup_num_tokens=0))
        jax.block_until_ready(res["plain"])

    def spec():
        res["spec"] = gen.decode_batch(target, tokens, lengths, opts, draft=draft)
        jax.block_until_ready(res["spec"])

    t_plain = t_spec = np.inf
    for _ in range(2):  # alternating, so that a busy spell hits both
        t_plain = min(t_plain, _best_time(plain, _REPEATS.value))
        t_spec = min(t_spec, _best_time(spec, _REPEATS.value))
    out, stats = res["spec"]
    same = np.array_equal(np.asarray(out.tokens_BxN), np.asarray(res["plain"].tokens_BxN))
    return t_plain, t_spec, float(stats["accepted_per_iteration"]), same


def grouped_query(n):
    """Cached decoding of gpt_modern with each --kv_heads count (README: grouped-query)."""
    from t5x_lite import config as config_lib
    print("\n| gpt_modern, 8 heads | kv heads | batch | cached tok/s | ms/step | cache MiB |")
    print("|---|---|---|---|---|---|")
    for kv in map(int, _KV_HEADS.value):
        cfg = config_lib.gpt_modern(vocab_size=V, d_model=512, num_heads=8, num_kv_heads=kv,
                                    head_dim=64, d_ff=1408, num_layers=6, max_len=1024)
        rng = np.random.default_rng(0)
        loaded = _random_loaded(cfg, lambda name, shape: (
            rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))
        for b in map(int, _BATCHES.value):
            t, steps = time_cached(loaded, _prompts(b, _PROMPT.value), n)
            cache = gen.cache_bytes(cfg, b, _PROMPT.value + n, 0, 1) / 2**20
            print(f"| | {kv} | {b} | {b * steps / t:.1f} | {1e3 * t / steps:.2f} | "
                  f"{cache:.1f} |", flush=True)


STOP_STRINGS = ["\n\n", "Question:", "###", "</answer>"]


def _word_vocab(size: int):
    """A stand-in vocabulary for timing stop strings: id i's text is a random lowercase word
    of 1-8 letters (so `STOP_STRINGS` are never completed)."""
    rng = np.random.default_rng(0)
    words = tuple(bytes(rng.integers(97, 123, rng.integers(1, 9)).tolist()) for _ in range(size))
    return types.SimpleNamespace(token_bytes=lambda: words)


def processors_cost(built, n):
    """ms per step of cached greedy decoding with HF's sequence processors off and on, and
    with stop strings."""
    on = dict(repetition_penalty=1.2, no_repeat_ngram_size=3, min_new_tokens=n // 2)
    print("\n| model | batch | processors off: ms/step | on: ms/step | on / off | "
          "stop strings: ms/step | stop strings / off |")
    print("|---|---|---|---|---|---|---|")
    for kind, (_, loaded) in built.items():
        vocab = _word_vocab(loaded.model.config.vocab_size)
        start = time.perf_counter()
        stop_strings.host_tables(vocab.token_bytes(), tuple(STOP_STRINGS))
        build_s = time.perf_counter() - start
        words = types.SimpleNamespace(**{**vars(loaded), "vocab": vocab})
        for b in map(int, _BATCHES.value):
            prompts = _prompts(b, _PROMPT.value)
            best = {}
            for _ in range(2):  # alternating, so that a busy spell hits both
                for name, model, kw in (("off", loaded, {}), ("on", loaded, on),
                                        ("stops", words, {"stop_strings": STOP_STRINGS})):
                    t, steps = time_cached(model, prompts, n, **kw)
                    best[name] = min(best.get(name, np.inf), t / steps)
            print(f"| {kind} | {b} | {1e3 * best['off']:.2f} | {1e3 * best['on']:.2f} | "
                  f"{best['on'] / best['off']:.3f} | {1e3 * best['stops']:.2f} | "
                  f"{best['stops'] / best['off']:.3f} |", flush=True)
        print(f"{kind}: stop strings' tables for {len(vocab.token_bytes())} ids built in "
              f"{build_s:.2f} s (host)", flush=True)


def main(argv):
    del argv
    n = _NEW.value
    print(f"devices: {jax.devices()}; cpu cores: {os.cpu_count()}; "
          f"load average: {os.getloadavg()[0]:.1f}; {host_memory.status()}; decode compiler "
          f"options: {compiler.decode_compiler_options() or 'none'}; {idle_polling()}")
    bw, bw_copy = memory_bandwidth()
    print(f"measured memory bandwidth: read {bw / 1e9:.1f} GB/s (jitted sum of 512 MiB), "
          f"copy {bw_copy / 1e9:.1f} GB/s (in place, read + write)\n")
    print("| model | batch | prefill ms | ms/token | cached tok/s | uncached tok/s | "
          "cached/uncached | HF tok/s | ours/HF | ours/HF, paired (median [min-max] of "
          f"{_HF_ROUNDS.value} rounds) | roofline tok/s (b=1, median round) | "
          f"% of roofline, read / copy (median [min-max] of {_ROUNDS.value} paired rounds) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    built, spreads = {}, []
    for kind in _MODELS.value:
        hf_model, loaded = built[kind] = build(kind)
        for b in map(int, _BATCHES.value):
            prompts = _prompts(b, _PROMPT.value)
            t_cached, steps = time_cached(loaded, prompts, n)
            t_prefill = time_prefill(loaded, prompts, n)
            per_token = (t_cached - t_prefill) / max(steps - 1, 1)
            t_uncached = time_uncached(loaded, prompts, n)
            t_hf, threads = (None, None) if _SKIP_HF.value else time_hf(hf_model, prompts, n)
            tps = b * steps / t_cached
            unc = b * n / t_uncached
            hf = "-" if t_hf is None else f"{b * n / t_hf:.1f}"
            ratio = "-" if t_hf is None else f"{tps / (b * n / t_hf):.2f}x"
            paired = "-" if t_hf is None else ratio_cell(
                paired_hf_ratios(loaded, hf_model, prompts, n, threads, _HF_ROUNDS.value))
            roof = frac = "-"
            if b == 1:
                # the self-attention cache: GPT's holds the prompt, T5's decoder's does not
                held = _PROMPT.value if loaded.model.config.family == "gpt" else 1
                step_bytes = bytes_per_token(loaded, held + n // 2, _PROMPT.value)
                rounds = paired_roofline_shares(loaded, prompts, n, step_bytes, _ROUNDS.value)
                roof, frac = roofline_cells(rounds, step_bytes)
                tps_r, bw_r, _ = zip(*rounds)
                spreads.append(f"{kind} batch 1, {len(rounds)} paired rounds: read probe "
                               f"{min(bw_r) / 1e9:.1f}-{max(bw_r) / 1e9:.1f} GB/s, decode "
                               f"{min(tps_r):.1f}-{max(tps_r):.1f} tok/s, "
                               f"{step_bytes / 1e6:.1f} MB per token")
            gain = tps / unc  # one decimal below 10x (a tiny run's 0.4x printed as "0x")
            print(f"| {kind} | {b} | {1e3 * t_prefill:.1f} | {1e3 * per_token:.2f} | {tps:.1f} | "
                  f"{unc:.2f} | {gain:.{0 if gain >= 10 else 1}f}x | {hf} | {ratio} | {paired} | "
                  f"{roof} | "
                  f"{frac} |", flush=True)
    if spreads:
        print("\n" + "\n".join(spreads), flush=True)
    if _KV_HEADS.value:
        grouped_query(n)
    if _COMPILE_COMPARE.value:
        compile_compare(built, n)
    if _PROCESSORS.value:
        processors_cost(built, n)
    if _SPEC.value and "gpt" in built:
        d = _DRAFT_LAYERS.value
        print(f"\nspeculative (greedy, draft = the target's first {d} layer(s) with its "
              f"embeddings and head, num_draft {_NUM_DRAFT.value}, batch 1, {n} tokens):")
        print("| target | plain tok/s | speculative tok/s | speed-up | accepted drafts/pass | "
              "same output |")
        print("|---|---|---|---|---|---|")
        targets = [("GPT 36M, 6 layers", built["gpt"][1])]
        targets.append((f"GPT, {_DEEP.value} layers (scanned)", deep_gpt(_DEEP.value)))
        for name, target in targets:
            t_plain, t_spec, acc, same = speculative(target, first_layers_draft(target, d), n)
            print(f"| {name} | {n / t_plain:.1f} | {n / t_spec:.1f} | {t_plain / t_spec:.2f}x | "
                  f"{acc:.2f} | {same} |", flush=True)
    if _LOOKUP.value and "gpt" in built:
        print(f"\nprompt lookup (greedy, no draft model, max_matching_ngram_size 2, batch 1, "
              f"{n} tokens):")
        print("| target | prompt_lookup_num_tokens | plain tok/s | lookup tok/s | speed-up | "
              "accepted proposals/pass | same output |")
        print("|---|---|---|---|---|---|---|")
        for k in map(int, _LOOKUP.value):
            t_plain, t_spec, acc, same = speculative(built["gpt"][1], None, n,
                                                     prompt_lookup_num_tokens=k)
            print(f"| GPT 36M, 6 layers | {k} | {n / t_plain:.1f} | {n / t_spec:.1f} | "
                  f"{t_plain / t_spec:.2f}x | {acc:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    app.run(main)
