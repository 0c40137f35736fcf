"""benchmarks/decode_speed.py's roofline: the bytes it counts per token are the params a cached
decode step actually reads (found by a liveness walk over the traced step's jaxpr) plus the
float32 KV cache the step attends over; each round's share pairs a decode with the probe just
before it. benchmarks/decode_profile.py: op times and pool joins from a trace, and the trace
format of the installed jax."""
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding_testlib

from t5x_lite import config as config_lib
from t5x_lite.decoding import steps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import decode_speed  # noqa: E402

TINY = dict(vocab_size=128, d_model=32, num_heads=2, head_dim=16, d_ff=48, num_layers=2)


def _used_inputs(jaxpr) -> list[bool]:
    """Which inputs the outputs depend on: an equation is live when one of its outputs is, and
    then so are all its inputs (nested jaxprs count whole)."""
    live = {v for v in jaxpr.outvars if not hasattr(v, "val")}  # Literals have .val
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not hasattr(v, "val"))
    return [v in live for v in jaxpr.invars]


def _step_reads(cfg, params, prompt_len, cache_len):
    """(paths of the params the cached decode step uses, float bytes of its cache)."""
    ucfg, uparams = steps.unrolled(cfg, params)
    prompt = jnp.asarray(np.arange(2, 2 + prompt_len, dtype=np.int32)[None])
    ids = jnp.zeros((1, 1), jnp.int32)
    if cfg.family == "t5":
        _, cache, mask = steps.t5_prefill(ucfg, uparams, prompt, cache_len)

        def step(params, cache):
            c, p = steps.unrolled(cfg, params)
            return steps.t5_step_fn(c, p, mask)(ids, cache)[0]
    else:
        _, cache, _ = steps.gpt_prefill(ucfg, uparams, prompt, jnp.array([prompt_len]),
                                        cache_len)

        def step(params, cache):
            c, p = steps.unrolled(cfg, params)
            return steps.gpt_step_fn(c, p)(ids, cache)[0]

    used = _used_inputs(jax.make_jaxpr(step)(params, cache).jaxpr)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    used_paths = {jax.tree_util.keystr(path) for (path, _), u in zip(flat, used) if u}
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache)
                      if jnp.issubdtype(x.dtype, jnp.floating))
    return used_paths, cache_bytes


@pytest.mark.parametrize("preset,scan,gathered", [
    ("t5_1_1", False, "['token_embedder']['embedding']"),  # untied: one row read
    ("t5_1_1", True, "['token_embedder']['embedding']"),
    ("t5_1_0", False, None),  # tied: the embedding is the head, read in full
    ("gpt2", False, "['position_embedder']['embedding']"),
    ("gpt2", True, "['position_embedder']['embedding']"),
])
def test_bytes_per_token_are_the_params_and_cache_a_decode_step_reads(preset, scan, gathered):
    extra = dict(num_decoder_layers=3) if preset.startswith("t5") else dict(max_len=32)
    cfg = config_lib.from_preset(preset, **TINY, **extra, scan_layers=scan)
    loaded = decoding_testlib.loaded(cfg)
    prompt_len, cache_len = 5, 12
    used, cache_bytes = _step_reads(cfg, loaded.params, prompt_len, cache_len)
    counted = decode_speed.step_weights(cfg, loaded.params)
    # Every param the step uses is counted, except the table it reads one row of.
    assert set(counted) == used - {gathered}
    if gathered:
        assert gathered in used
    if cfg.family == "t5":  # the encoder and the cross-attention K/V kernels are not read
        assert not any("encoder" in p for p in counted)
        assert not any("cross_attention" in p and ("key" in p or "value" in p)
                       for p in counted)
        assert any("cross_attention']['query" in p for p in counted)
    # By hand: all params, less the encoder, cross-attention K/V and the one-row table.
    flat = jax.tree_util.tree_flatten_with_path(loaded.params)[0]
    by_hand = sum(x.size for path, x in flat
                  if not any(s in jax.tree_util.keystr(path) for s in (
                      "['encoder", "['cross_attention']['key']",
                      "['cross_attention']['value']", gathered or "-")))
    assert sum(x.size for x in counted.values()) == by_hand
    got = decode_speed.bytes_per_token(loaded, cache_len, prompt_len)
    assert got == 4 * by_hand + cache_bytes


def test_hf_is_timed_like_ours(monkeypatch):
    """Per torch thread count: a full-length warm-up, then --repeats timed full-length runs."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(decode_speed, "_REPEATS", types.SimpleNamespace(value=3))
    calls = []

    class FakeHF:
        def generate(self, ids, **kw):
            calls.append((torch.get_num_threads(), kw.get("max_new_tokens")))

    threads = torch.get_num_threads()
    _, best_threads = decode_speed.time_hf(FakeHF(), np.zeros((1, 4), np.int32), 8)
    assert calls == [(t, 8) for t in sorted({1, threads}) for _ in range(1 + 3)]
    assert best_threads in {1, threads}
    assert torch.get_num_threads() == threads


def test_hf_keeps_the_faster_thread_count(monkeypatch):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    if threads == 1:
        pytest.skip("one torch thread: no choice to make")
    monkeypatch.setattr(decode_speed, "_REPEATS", types.SimpleNamespace(value=3))
    for slow, fast in ((1, threads), (threads, 1)):
        seconds = {slow: 5.0, fast: 3.0}
        monkeypatch.setattr(decode_speed, "_best_time",
                            lambda fn, repeats: seconds[torch.get_num_threads()])
        assert decode_speed.time_hf(None, np.zeros((1, 4), np.int32), 8) == (3.0, fast)
        assert torch.get_num_threads() == threads


def test_hf_ratios_pair_each_decode_with_an_hf_run_in_alternating_order(monkeypatch):
    """Round i's ratio is its own decode rate / its own HF rate, at the thread count given;
    ours runs first in even rounds, HF in odd ones; the thread count is restored afterwards."""
    torch = pytest.importorskip("torch")
    order = []
    # ours: 100 steps in 2, 1, 4 s; HF: 8 tokens in 0.5, 0.2, 1 s (round 2 runs HF first)
    times = iter([0.0, 2.0, 2.0, 2.5, 3.0, 3.2, 4.0, 5.0, 5.0, 9.0, 9.0, 10.0])

    class FakeHF:
        def generate(self, ids, **kw):
            order.append(("hf", torch.get_num_threads(), kw["max_new_tokens"]))

    def cached_run(loaded, prompts, n):
        return (lambda: order.append("ours")), (lambda: 100)

    monkeypatch.setattr(decode_speed, "cached_run", cached_run)
    monkeypatch.setattr(decode_speed.time, "perf_counter", lambda: next(times))
    threads = torch.get_num_threads()
    ratios = decode_speed.paired_hf_ratios(None, FakeHF(), np.zeros((2, 4), np.int32), 8, 1, 3)
    hf = ("hf", 1, 8)
    assert order == ["ours"] + ["ours", hf] + [hf, "ours"] + ["ours", hf]
    assert ratios == pytest.approx([50 / 16, 100 / 40, 25 / 8])
    assert torch.get_num_threads() == threads
    assert decode_speed.ratio_cell(ratios) == "3.12x [2.50-3.12]"
    assert decode_speed.ratio_cell([]) == "-"


def test_header_reports_the_guest_halt_polling(tmp_path):
    f = tmp_path / "guest_halt_poll_ns"
    f.write_text("200000\n")
    assert decode_speed.idle_polling(str(f)) == "guest halt polling: 200000 ns"
    f.write_text("0\n")
    assert decode_speed.idle_polling(str(f)).startswith("guest halt polling: off (0 ns")
    f.write_text("fast\n")
    assert decode_speed.idle_polling(str(f)) == "guest halt polling: n/a"
    assert decode_speed.idle_polling(str(tmp_path / "none")) == "guest halt polling: n/a"


def test_train_throughput_peak_dtype_matches_or_is_warned_about():
    # Its own process: train_throughput defines absl flags of the same names as decode_speed.
    code = """
import sys
sys.path.insert(0, "benchmarks")
from absl import flags
import train_throughput as t
flags.FLAGS(["x"])
assert t.compute_dtype() == "float32", t.compute_dtype()  # CPU default: the measured f32 peak
assert t.peak_warning("measured", "float32") is None
assert t.peak_warning("table", "bfloat16") is None
assert "WARNING" in t.peak_warning("table", "float32")
assert "WARNING" in t.peak_warning("measured", "bfloat16")
flags.FLAGS(["x", "--dtype=bfloat16"])
assert t.model_setup("tiny_gpt", False)[0].dtype == "bfloat16"
"""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_roofline_shares_pair_each_decode_with_the_probe_just_before_it(monkeypatch):
    """Round i's share is its own decode rate x step bytes / its own probe: the best decode
    and the best probe of different rounds are never divided by each other."""
    order, probes = [], iter([(100.0, 200.0), (50.0, 80.0), (200.0, 400.0)])
    times = iter([0.0, 2.0, 10.0, 11.0, 20.0, 24.0])  # run lengths 2, 1, 4 s

    def probe(repeats):
        order.append("probe")
        return next(probes)

    def cached_run(loaded, prompts, n):
        return (lambda: order.append("run")), (lambda: 100)

    monkeypatch.setattr(decode_speed, "memory_bandwidth", probe)
    monkeypatch.setattr(decode_speed, "cached_run", cached_run)
    monkeypatch.setattr(decode_speed.time, "perf_counter", lambda: next(times))
    rounds = decode_speed.paired_roofline_shares(None, None, 8, 1.0, 3)
    assert order == ["run"] + ["probe", "run"] * 3  # a warm run, then probe -> decode
    assert rounds == [(50.0, 100.0, 200.0), (100.0, 50.0, 80.0), (25.0, 200.0, 400.0)]
    roof, shares = decode_speed.roofline_cells(rounds, 1.0)
    # read shares 50%, 200%, 12.5%; copy 25%, 125%, 6.25%; read probes 100, 50, 200 B/s
    assert roof == "100.0"
    assert shares == "50% [12-200] / 25% [6-125]"


def _profile_events(ops, blocks, pool=("XLAEigen/1", "XLAEigen/2")):
    """A perfetto trace: `ops` (name, thread, start, dur) as thread-pool op events, `blocks`
    (thread, start) as other pool threads starting an op's parallel blocks."""
    meta = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": i, "args": {"name": n}}
            for i, n in enumerate(pool)]
    meta.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "py"}})
    events = [{"ph": "X", "pid": 1, "tid": t, "ts": ts, "dur": d, "name": n,
               "args": {"hlo_op": n}} for n, t, ts, d in ops]
    events += [{"ph": "X", "pid": 1, "tid": t, "ts": ts, "dur": 0,
                "name": "ThreadpoolListener::StartRegion", "args": {}} for t, ts in blocks]
    events.append({"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 1e6, "name": "dot.1",
                   "args": {"hlo_op": "dot.1"}})  # not a pool thread: not an op of the step
    return meta + events


def test_decode_profile_times_a_chain_of_ops_and_the_pool_joins(capsys):
    import decode_profile
    hlo = """
  %p.1 = f32[1,1000]{1,0} parameter(0)
  %w.2 = f32[1000,250]{1,0} parameter(1)
  %dot.1 = f32[1,250]{1,0} dot(%p.1, %w.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %add_fusion.3 = f32[1,250]{1,0} fusion(%dot.1), kind=kLoop, calls=%c
  %while.4 = (f32[1,250]{1,0}) while(%t), condition=%cond, body=%body
"""
    # two steps: the product returns at once (dur 5) and runs as blocks until the add starts
    ops = [("while.4", 0, 0, 500), ("dot.1", 0, 10, 5), ("add_fusion.3", 1, 110, 2),
           ("dot.1", 1, 200, 5), ("add_fusion.3", 0, 300, 2)]
    blocks = [(1, 40), (0, 210), (0, 250)]
    decode_profile.summarise(_profile_events(ops, blocks), hlo, 2, 10)
    out = capsys.readouterr().out
    # dot: 100 us per call (start to the next op's start); operands 4004 B + 1e6 B per call
    assert "| dot f32[1,1000] x f32[1000,250] -> f32[1,250] | 1.0 | 100.0 | 0.100 | 10.0 |" in out
    assert "| add_fusion | 1.0 | 46.0 | 0.046 | - |" in out  # 90 us to the next dot; 2 at the end
    assert "while" not in out
    # joins: the first call's blocks start 30 us in on the other thread, the second's 10 us in
    assert "| dot f32[1,1000] x f32[1000,250] -> f32[1,250] | 1.00 | 20.0 | 20.0 |" in out
    with pytest.raises(SystemExit, match="no XLA:CPU op events"):
        decode_profile.summarise(_profile_events([], []), hlo, 2, 10)


def test_decode_profile_reads_this_jax_versions_trace(tmp_path):
    """The trace format the profile depends on: pool-thread op events named by the compiled
    module's HLO instructions."""
    import decode_profile
    w = jnp.ones((512, 2048), jnp.float32)
    f = jax.jit(lambda x, w: jax.lax.fori_loop(0, 4, lambda i, x: jnp.tanh(x @ w)[:, :512], x))
    x = jnp.ones((1, 512), jnp.float32)
    compiled = f.lower(x, w).compile()
    compiled(x, w).block_until_ready()
    events = decode_profile.trace_events(lambda: compiled(x, w).block_until_ready(), 1)
    names = {e["name"] for e in events if "hlo_op" in e.get("args", {})
             and e["args"]["hlo_op"] == e.get("name")}
    dots = decode_profile._dot_operands(compiled.as_text())
    assert dots and set(dots) <= names
    shapes = decode_profile._shapes(compiled.as_text())
    assert any(shapes[o] == ("f32[512,2048]", 512 * 2048 * 4) for d in dots for o in dots[d])
