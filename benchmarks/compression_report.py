r"""Measures the numbers in README.md on a trained tiny T5 (configs/tiny_t5.py).

    python -m t5x_lite.train --config=configs/tiny_t5.py --workdir=/tmp/tiny_t5
    python benchmarks/compression_report.py --base=/tmp/tiny_t5 --out=/tmp/compression \
        [--parts=int8,lora,prune,distill] [--steps=200] [--eval_batches=16] \
        [--int8_also=/tmp/tiny_gpt]

Prints one JSON line per measurement and writes them to OUT/report.jsonl:
- int8: param bytes and the compiled logits function's argument bytes (float vs int8), eval
  loss float vs int8, relative RMS logit error and next-token argmax agreement (teacher
  forced), and free-running greedy outputs: token-wise agreement, identical-prefix fraction,
  identical sequences (also for the --int8_also workdirs, e.g. a tiny GPT).
- lora: trainable params (fraction of the base), checkpoint bytes, eval loss before / after
  `steps` steps of configs/lora_tiny_t5.py, time per step.
- prune: sparsity vs eval loss, one-shot without fine-tuning (unstructured global / heads /
  MLP units at several sparsities) and after `steps` fine-tuning steps with the masks.
- distill: a half-width 1+1-layer student trained `steps` steps with the distillation loss vs
  the same student trained on the labels only.
Eval loss: mean cross entropy (no z-loss) over the first `eval_batches` batches (16 rows) of the
eval split, the same batches for every row of the report.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

import t5x_lite
from t5x_lite import (checkpoints, cli, compression, host_memory, lora, partitioning, pruning,
                      quantization)
from t5x_lite.data import DataConfig, load_vocab, make_dataset
from t5x_lite.decoding import generate as gen
from t5x_lite.errors import UserError
from t5x_lite.models import LossConfig, build_model
from t5x_lite.training import train, train_state, train_step

_BASE = flags.DEFINE_string("base", None, "Trained tiny T5 workdir.", required=True)
_OUT = flags.DEFINE_string("out", "/tmp/compression_report", "Where runs and the report go.")
_PARTS = flags.DEFINE_list("parts", ["int8", "lora", "prune", "distill"],
                           "What to measure (any of int8, lora, prune, distill).")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps of the LoRA / pruning / distillation "
                              "runs.")
_INT8_ALSO = flags.DEFINE_list("int8_also", [], "More trained workdirs (e.g. a tiny GPT) for "
                                "the int8 part.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 16, "Eval batches (16 rows each).")

REPO = pathlib.Path(__file__).resolve().parent.parent
PROG = "compression_report"
PARTS = ("int8", "lora", "prune", "distill")


def _recipe(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _report(out: pathlib.Path, **row):
    line = json.dumps(row, default=float)
    print(line, flush=True)
    with (out / "report.jsonl").open("a") as f:
        f.write(line + "\n")


def _eval_batches(run, n, pack=True):
    data = run.data.to_dict()
    data["pack"] = pack  # unpacked: one example per row (decoding prompts)
    it = make_dataset(data, load_vocab(run.data), split=DataConfig.from_dict(data).eval_split,
                      batch_size=16, seed=0, shuffle=False, repeat=False)
    return [b for _, b in zip(range(n), it)]


def eval_loss(loaded, batches) -> float:
    """Mean target cross entropy (no z-loss) over the batches."""
    model = build_model(loaded.config, LossConfig(z_loss=0.0))
    sums = jax.jit(lambda p, b: model.loss_fn(p, b)[1])
    totals = [jax.device_get(sums(loaded.params, b)) for b in batches]
    return float(sum(t["loss_sum"] for t in totals) / sum(t["weight_sum"] for t in totals))


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _prompts(loaded, n_rows=32):
    """Decoding prompts: T5 encoder inputs / the first 32 tokens of GPT rows (unpacked eval)."""
    batches = _eval_batches(loaded.run_config, (n_rows + 15) // 16, pack=False)
    key = "encoder_input_tokens" if loaded.config.family == "t5" else "decoder_input_tokens"
    rows = [r[r > 0] for b in batches for r in b[key]][:n_rows]
    return [[int(t) for t in (r if loaded.config.family == "t5" else r[:32])] for r in rows]


def measure_int8(path, out, batches):
    plain, q = t5x_lite.load(path), t5x_lite.load(path, quantize="int8")
    mem = quantization.memory_report(plain.params, q.params)
    model = plain.model
    inputs = [{k: v for k, v in b.items() if k in model.input_features} for b in batches]
    f = jax.jit(model.logits)
    args = [f.lower(p, inputs[0]).compile().memory_analysis().argument_size_in_bytes
            for p in (plain.params, q.params)]
    # Teacher-forced: relative RMS logit error and next-token argmax agreement on target tokens.
    err = ref = same = count = 0.0
    for b, x in zip(batches, inputs):
        lf, lq = np.asarray(f(plain.params, x)), np.asarray(f(q.params, x))
        w = np.asarray(b[model.weight_feature]) > 0
        err += float(np.sum((lf - lq)[w] ** 2))
        ref += float(np.sum(lf[w] ** 2))
        same += float(np.sum((lf.argmax(-1) == lq.argmax(-1))[w]))
        count += float(w.sum())
    prompts = _prompts(plain)
    n = int(plain.run_config.data.targets_length) if plain.config.family == "t5" else 32
    outs = [[r["ids"] for r in gen.generate(m, input_ids=prompts, max_new_tokens=n,
                                            method="greedy")] for m in (plain, q)]
    same_tokens = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(*outs))
    total_tokens = sum(max(len(x), len(y)) for x, y in zip(*outs))
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
              / max(len(x), len(y), 1) for x, y in zip(*outs)]
    _report(out, part="int8", model=str(path), family=plain.config.family,
            param_bytes_float=mem["float_bytes"], param_bytes_int8=mem["quantized_bytes"],
            param_ratio=mem["ratio"], compiled_arg_bytes_float=args[0],
            compiled_arg_bytes_int8=args[1], eval_loss_float=eval_loss(plain, batches),
            eval_loss_int8=eval_loss(q, batches), logits_rel_rms_error=(err / ref) ** 0.5,
            teacher_forced_argmax_agreement=same / count,
            greedy_token_agreement=same_tokens / total_tokens,
            greedy_identical_prefix_fraction=float(np.mean(prefix)),
            greedy_sequences_identical=float(np.mean([x == y for x, y in zip(*outs)])),
            greedy_rows=len(prompts), greedy_max_new_tokens=n)


def train_step_memory(model, tx, batch) -> dict[str, int]:
    """The compiled train step's memory (one device): arguments (params, optimizer state,
    batch), what is aliased (donated state), temporaries."""
    mesh = partitioning.make_mesh()
    rules = partitioning.DEFAULT_RULES
    abstract, shardings = train_state.state_shardings(model, tx, mesh, rules)
    step = train_step.jit_train_step(train_step.make_train_step(model, tx, lambda s: 0.0),
                                     shardings, mesh, rules)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    with partitioning.activate(mesh, rules):
        m = step.jitted.lower(abstract, spec, jax.random.key(0)).compile().memory_analysis()
    return {"argument_bytes": m.argument_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
            "temp_bytes": m.temp_size_in_bytes,
            "opt_state_bytes": compression.param_bytes(abstract.opt_state)}


def measure_lora(base, out, batches, steps):
    workdir = out / "lora"
    run = _recipe("lora_tiny_t5", f"base={base},steps={steps},save_every={steps}")
    t0 = time.time()
    result = train(run, workdir)
    dt = (time.time() - t0) / max(result.step, 1)
    model = build_model(t5x_lite.load(base).config)
    boxed = model.init(jax.random.key(0))["params"]
    adapters = nn.meta.unbox(lora.init_adapters(jax.random.key(0), boxed,
                                                lora.LoraConfig.from_dict(run.lora)))
    n_lora, n_base = compression.param_count(adapters), compression.param_count(
        nn.meta.unbox(boxed))
    _, base_step = checkpoints.resolve(base)
    base_loss = eval_loss(t5x_lite.load(base), batches)
    tx = optax.adamw(1e-3)
    full_mem = train_step_memory(model, tx, batches[0])
    lora_mem = train_step_memory(lora.LoraModel(model, lora.LoraConfig.from_dict(run.lora)),
                                 compression.freeze_optimizer(tx, "lora"), batches[0])
    _report(out, part="lora", rank=run.lora.rank, targets=run.lora.targets, steps=result.step,
            trainable_params=n_lora, base_params=n_base, trainable_fraction=n_lora / n_base,
            checkpoint_params_bytes=_dir_bytes(
                workdir / checkpoints.CHECKPOINT_DIR / str(result.step) / "params"),
            base_checkpoint_params_bytes=_dir_bytes(pathlib.Path(checkpoints.resolve(base)[0]) /
                                                    checkpoints.CHECKPOINT_DIR / str(base_step) /
                                                    "params"),
            eval_loss_base=base_loss, eval_loss_lora=eval_loss(t5x_lite.load(workdir), batches),
            wall_s_per_step_incl_compile=dt,
            **{f"full_ft_step_{k}": v for k, v in full_mem.items()},
            **{f"lora_step_{k}": v for k, v in lora_mem.items()})


def measure_prune(base, out, batches, steps):
    loaded = t5x_lite.load(base)
    boxed = loaded.model.init(jax.random.key(0))["params"]
    axes = compression.logical_axes(boxed)
    params = jax.device_get(loaded.params)
    dense = eval_loss(loaded, batches)
    _report(out, part="prune", mode="dense", sparsity=0.0, eval_loss=dense)
    grid = [("unstructured", s) for s in (0.25, 0.5, 0.75, 0.9)] + \
           [("heads", s) for s in (0.25, 0.5)] + [("mlp_units", s) for s in (0.25, 0.5)]
    for structure, s in grid:
        cfg = pruning.PruneConfig(sparsity=s, structure=structure)
        pruned, _ = pruning.prune_params(params, axes, cfg)
        loaded.params = jax.device_put(pruned, jax.tree.map(lambda x: x.sharding, loaded.params))
        rep = pruning.sparsity_report(pruned, axes, cfg)
        _report(out, part="prune", mode="one_shot", structure=structure, target=s,
                achieved_sparsity=rep["sparsity"], eval_loss=eval_loss(loaded, batches))
    for structure, s, schedule in (("unstructured", 0.0, "one_shot"),  # dense fine-tuning
                                   ("unstructured", 0.5, "one_shot"),
                                   ("unstructured", 0.75, "one_shot"),
                                   ("unstructured", 0.75, "polynomial"),
                                   ("heads", 0.5, "one_shot")):
        workdir = out / f"prune_{structure}_{s}_{schedule}"
        arg = (f"init_from={base},sparsity={s},structure={structure},schedule={schedule},"
               f"steps={steps},save_every={steps},frequency={max(steps // 10, 1)},"
               f"end_step={steps // 2}")
        run = _recipe("prune_tiny_t5", arg)
        train(run, workdir)
        tuned = t5x_lite.load(workdir)
        rep = pruning.sparsity_report(jax.device_get(tuned.params), axes,
                                      pruning.PruneConfig.from_dict(run.prune))
        _report(out, part="prune", mode=f"{schedule}+finetune", structure=structure, target=s,
                steps=steps, achieved_sparsity=rep["sparsity"],
                eval_loss=eval_loss(tuned, batches))


def measure_distill(base, out, batches, steps):
    rows = {}
    for name, arg in (("distilled", f"teacher={base}"),
                      ("labels_only", f"teacher={base},kl_weight=0,label_weight=1")):
        run = _recipe("distill_tiny_t5", f"{arg},steps={steps},save_every={steps}")
        t0 = time.time()
        train(run, out / name)
        rows[name] = (eval_loss(t5x_lite.load(out / name), batches), time.time() - t0)
    teacher = t5x_lite.load(base)
    student = t5x_lite.load(out / "distilled")
    _report(out, part="distill", steps=steps,
            teacher_params=compression.param_count(teacher.params),
            student_params=compression.param_count(student.params),
            eval_loss_teacher=eval_loss(teacher, batches),
            eval_loss_student_distilled=rows["distilled"][0],
            eval_loss_student_labels_only=rows["labels_only"][0],
            wall_s_distilled=rows["distilled"][1], wall_s_labels_only=rows["labels_only"][1])


def main(argv):
    if len(argv) > 1:
        cli.exit_with(PROG, f"unexpected arguments {argv[1:]}")
    try:
        _run()
    except cli.ERRORS as e:
        cli.exit_with(PROG, e)


def _run():
    logging.set_verbosity(logging.WARNING)
    unknown = [p for p in _PARTS.value if p not in PARTS]
    if unknown:
        raise UserError(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    out = pathlib.Path(_OUT.value)
    base = _BASE.value
    base_run = checkpoints.read_config(checkpoints.resolve(base)[0])  # a bad --base: one line
    if out.exists() and any(out.iterdir()):  # its runs would resume, finished: no new numbers
        raise UserError(f"--out {out} holds an earlier report; remove it or use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    batches = _eval_batches(base_run, _EVAL_BATCHES.value)
    def int8():
        measure_int8(base, out, batches)
        for path in _INT8_ALSO.value:
            run = checkpoints.read_config(checkpoints.resolve(path)[0])
            measure_int8(path, out, _eval_batches(run, _EVAL_BATCHES.value))

    parts = {"int8": int8,
             "lora": lambda: measure_lora(base, out, batches, _STEPS.value),
             "prune": lambda: measure_prune(base, out, batches, _STEPS.value),
             "distill": lambda: measure_distill(base, out, batches, _STEPS.value)}
    for part in _PARTS.value:
        parts[part]()


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    app.run(main, flags_parser=cli.flags_parser(PROG))
