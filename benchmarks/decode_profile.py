"""Where a cached decode step's time goes on XLA:CPU: a jax.profiler trace of greedy decoding,
summarised per op. Run by hand.

    python benchmarks/decode_profile.py                       # GPT-36M, batch 1, 256 tokens
    python benchmarks/decode_profile.py --model=t5 --batch=16 --new_tokens=64

Builds decode_speed.py's models (the same random HF-initialised weights), compiles the greedy
program (`_sample_jit`: prefill + the cached while loop) once, runs it once to warm up, then
traces --runs runs. XLA:CPU's thunk executor records every op it runs (named by its HLO
instruction) on the thread that runs it, and the intra-op thread pool records when its other
threads start an op's parallel blocks. From those events this prints:

  ops       per op (dots by operand and output shapes; other ops pooled by kind): calls per
            step, median us per call, ms per step, and for dots the GB/s of their operands
            (the weights and the KV cache they read). A step is a chain (each op needs the
            one before) and a large product returns to the executor at once and runs as
            blocks on the pool's threads, so an op's time runs from its start to the next
            op's start.
  joins     per product run as parallel blocks: the share of its calls whose blocks ran on
            another thread, and how long after the product starts that thread's first block
            starts (median and mean us). A pool thread that found no work for a while parks,
            and waking it costs that much more on a VM.

The trace is XLA:CPU's (jax 0.10's perfetto JSON); another backend or version may name events
differently: the script then stops with one line.

The joins depend on the host: on a VM guest whose idle vCPUs halt at once (cpuidle-haltpoll
with guest_halt_poll_ns 0, which the header line reports), a product that follows ~70 us or more
of single-threaded work waits ~40-55 us for its second thread; with 200 us of polling, ~10 us.
"""
from __future__ import annotations

import bisect
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_speed  # noqa: E402  (the models and the prompt maker)

from t5x_lite.decoding import generate as gen  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "gpt", ["gpt", "t5"], "decode_speed.py's GPT-36M or T5.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows decoded together.")
_RUNS = flags.DEFINE_integer("runs", 2, "Traced runs of the compiled program.")
_TOP = flags.DEFINE_integer("top", 14, "Ops listed, most time first.")

_SIZES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "pred": 1}


def _shapes(hlo: str) -> dict[str, tuple[str, int]]:
    """{instruction: (shape text, bytes)} of an optimized HLO module's array results."""
    out = {}
    for m in re.finditer(r"%([\w.-]+) = (\w+)\[([\d,]*)\]", hlo):
        dtype, dims = m.group(2), m.group(3)
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        out[m.group(1)] = (f"{dtype}[{dims}]", n * _SIZES.get(dtype, 4))
    return out


def _dot_operands(hlo: str) -> dict[str, tuple[str, ...]]:
    return {m.group(1): tuple(re.findall(r"%([\w.-]+)", m.group(2)))
            for m in re.finditer(r"%([\w.-]+) = \S+ dot\(([^)]*)\)", hlo)}


def compiled_greedy(loaded, prompts, n):
    """(compiled program, its arguments): the greedy decode `decode_batch` runs, on the
    weights it passes (`decode_weights`: on CPU laid out once, outside the program)."""
    cfg, params = gen.decode_weights(loaded, loaded.model.config)
    fn, args, static = decode_speed.decode_program(cfg, params, prompts, n, "greedy")
    return fn.lower(*args, **static).compile(), args


def trace_events(run, runs: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(runs):
            run()
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        if not files:
            raise SystemExit(f"decode_profile: no perfetto trace written under {d}")
        with gzip.open(files[0]) as f:
            return json.load(f)["traceEvents"]


def summarise(events: list[dict], hlo: str, steps: int, top: int):
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    pool = {k for k, v in names.items() if "XLAEigen" in v}
    spans = sorted((e for e in events if e.get("ph") == "X" and "name" in e
                    and (e["pid"], e["tid"]) in pool),
                   key=lambda e: e["ts"])
    ops = [e for e in spans if "hlo_op" in e.get("args", {}) and e["args"]["hlo_op"] == e["name"]]
    if not ops:
        raise SystemExit("decode_profile: the trace has no XLA:CPU op events (another backend "
                         "or jax version?)")
    shapes, operands = _shapes(hlo), _dot_operands(hlo)
    # A step is a chain (each op needs the one before), and a large product returns to the
    # executor at once and runs as blocks on the pool: an op's time is from its start to the
    # next op's start. Ops that hold others (while, conditional, call) are left out.
    ops = [e for e in ops if not re.match(r"(while|conditional|call)(\.\d+)?$", e["name"])]
    ends = [nxt["ts"] for nxt in ops[1:]] + [ops[-1]["ts"] + ops[-1]["dur"]]

    def kind(name):
        if name in operands:
            ins = " x ".join(shapes.get(o, ("?", 0))[0] for o in operands[name])
            return f"dot {ins} -> {shapes.get(name, ('?', 0))[0]}"
        return re.sub(r"\.\d+$", "", name)

    calls, total, durs, moved = (collections.Counter(), collections.Counter(),
                                 collections.defaultdict(list), collections.Counter())
    for e, end in zip(ops, ends):
        k, dur = kind(e["name"]), end - e["ts"]
        calls[k] += 1
        total[k] += dur
        durs[k].append(dur)
        moved[k] += sum(shapes.get(o, ("", 0))[1] for o in operands.get(e["name"], ()))
    print(f"ops ({steps} steps traced; {sum(total.values()) / 1e3 / steps:.2f} ms of op time "
          "per step):")
    print("| op | calls/step | median us | ms/step | operand GB/s |")
    print("|---|---|---|---|---|")
    for k, t in total.most_common(top):
        rate = f"{moved[k] / (t * 1e-6) / 1e9:.1f}" if moved[k] else "-"
        print(f"| {k} | {calls[k] / steps:.1f} | {statistics.median(durs[k]):.1f} | "
              f"{t / 1e3 / steps:.3f} | {rate} |")

    block_starts = sorted((e["ts"], (e["pid"], e["tid"])) for e in spans
                          if e["name"] == "ThreadpoolListener::StartRegion")
    times = [t for t, _ in block_starts]
    joins = collections.defaultdict(list)
    for e, end in zip(ops, ends):
        if e["name"] not in operands:
            continue
        lo, hi = bisect.bisect_left(times, e["ts"]), bisect.bisect_right(times, end)
        other = [a for a, key in block_starts[lo:hi] if key != (e["pid"], e["tid"])]
        joins[kind(e["name"])].append(other[0] - e["ts"] if other else None)
    print("\njoins (products whose blocks ran on another pool thread):")
    print("| product | share run on >1 thread | median join us | mean join us |")
    print("|---|---|---|---|")
    for k, v in sorted(joins.items(), key=lambda kv: -total[kv[0]]):
        seen = [x for x in v if x is not None]
        if seen:
            print(f"| {k} | {len(seen) / len(v):.2f} | {statistics.median(seen):.1f} | "
                  f"{statistics.mean(seen):.1f} |")


def main(argv):
    del argv
    _, loaded = decode_speed.build(_MODEL.value)
    n = decode_speed._NEW.value
    prompts = decode_speed._prompts(_BATCH.value, decode_speed._PROMPT.value)
    compiled, args = compiled_greedy(loaded, prompts, n)

    def run():
        jax.block_until_ready(compiled(*args))

    run()
    events = trace_events(run, _RUNS.value)
    print(f"{_MODEL.value}, batch {_BATCH.value}, {decode_speed._PROMPT.value}-token prompts, "
          f"{n} new tokens, {_RUNS.value} traced runs; devices {jax.devices()}; "
          f"{decode_speed.idle_polling()}")
    summarise(events, compiled.as_text(), _RUNS.value * n, _TOP.value)


if __name__ == "__main__":
    app.run(main)
