"""Plan a run before paying for it: parameters, memory per device, FLOPs, time, token budget.

    python -m t5x_lite.estimate --config=configs/t5_1_1_base.py --mesh=1,16,1
    python -m t5x_lite.estimate --config=configs/gpt_1b.py --mesh=1,-1,1 --num_devices=64 \\
        --mfu=0.45 --accelerators=tpu_v5p,h100 --json
    python -m t5x_lite.estimate --config=configs/tiny_t5.py --verify   # vs XLA on this machine

Parameters are exact (the model's abstract init), memory per device follows the trainer's own
sharding and optimizer (`estimate_memory`), FLOPs use the formulas in `estimate_flops`, and
`--verify` compiles the trainer's real train step here and prints XLA's `memory_analysis()`
beside the estimate. Config overrides work as for training (`--config.train.batch_size=64`).
"""
from __future__ import annotations

import json

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from t5x_lite import cli, errors
from t5x_lite import estimate_flops as ef
from t5x_lite import estimate_memory as em
from t5x_lite import mesh_flag, quantization
from t5x_lite.config import ModelConfig
from t5x_lite.estimate_xla import sequence_lengths
from t5x_lite.mesh_flag import MESH
from t5x_lite.models import LossConfig, abstract_variables, build_model
from t5x_lite.partitioning import parse_mesh

cli.check_flagfiles("estimate")  # config_flags reads them when a flag is defined
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
flags.adopt_module_key_flags(mesh_flag)  # --mesh, listed in --help
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices in the run (default: the "
                                    "mesh's product, or the devices this machine sees when "
                                    "the mesh has a -1).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for step times.")
_ACCELERATORS = flags.DEFINE_list("accelerators", list(ef.ACCELERATORS),
                                  f"Which of {list(ef.ACCELERATORS)} to tabulate.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the text report.")
_VERIFY = flags.DEFINE_bool("verify", False, "Also compile the train step on this machine and "
                            "compare with XLA's memory_analysis().")

GB = 1e9
# Run-config sections the trainer honours (compression.from_config) but this plan does not model:
# it is the plan of plain training of config.model, so each present section is named in a note.
NOT_MODELLED = {
    "lora": "only the adapters are trained, so gradients and optimizer state are far below "
            "the figures here (the frozen base weights still count)",
    "distill": "the teacher's weights, activations and forward FLOPs are not counted",
    "prune": "the pruning masks kept beside the optimizer state are not counted",
}


class EstimateError(errors.UserError):
    """Estimator input that cannot be used (mesh vs batch, unknown accelerator, bad MFU)."""


def estimate(config: ml_collections.ConfigDict, *, mesh: tuple[int, int, int] | None = None,
             num_devices: int | None = None, mfu: float = 0.4,
             accelerators: list[str] | None = None) -> dict:
    """The full plan as a JSON-able dict (what `--json` prints).

    Args:
      config: a full run config.
      mesh: (data, fsdp, tensor) with at most one -1; default the config's mesh.
      num_devices: devices in the run; default the mesh's product (required with a -1).
    """
    if not 0 < mfu <= 1:
        raise EstimateError(f"--mfu must be in (0, 1], got {mfu}")
    if num_devices is not None and num_devices < 1:
        raise EstimateError(f"--num_devices must be >= 1, got {num_devices}")
    check_run_numbers(config)
    accelerators = list(ef.ACCELERATORS) if accelerators is None else accelerators
    unknown = [a for a in accelerators if a not in ef.ACCELERATORS]
    if unknown:
        raise EstimateError(f"Unknown accelerators {unknown}; known: {list(ef.ACCELERATORS)}")
    mesh = mesh or (int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor))
    if num_devices is None:
        if -1 in mesh:
            raise EstimateError(f"mesh {mesh} has a -1: pass --num_devices to size it")
        num_devices = max(mesh[0] * mesh[1] * mesh[2], 1)
    sizes = em.resolve_mesh(*mesh, num_devices)
    cfg = ModelConfig.from_dict(config.model)
    s, t = sequence_lengths(config)
    batch = int(config.train.batch_size)
    from t5x_lite.training.run_checks import check_batch_shards  # as check_run_numbers

    check_batch_shards(batch, int(config.train.microbatches), sizes.batch_shards, 1,
                       EstimateError)

    model = build_model(cfg)
    n = ef.count_params(model)
    predictions = LossConfig.for_run(config).mlm_predictions
    flops = ef.step_flops(cfg, batch, s, t, predictions)
    mem = em.estimate_memory(config, sizes)
    act = em.activation_bytes(config, sizes)
    budget = ef.chinchilla(n, flops)
    thumb = em.rule_of_thumb(n)
    per_accel = {}
    for name in accelerators:
        acc = ef.ACCELERATORS[name]
        step_s = ef.step_time(flops, sizes.num_devices, acc, mfu)
        per_accel[name] = {
            "peak_bf16_flops": acc.peak_bf16_flops, "memory_bytes": acc.memory_bytes,
            "step_seconds": step_s, "tokens_per_second": flops.tokens / step_s,
            "fits": mem.total <= acc.memory_bytes,
            "compute_optimal_days": budget.steps * step_s / 86400,
        }
    return {
        "notes": not_modelled(config),
        "model": {"family": cfg.family, "params": n, "params_formula": ef.param_count_formula(cfg),
                  "params_by_part": ef.param_count_by_part(cfg),
                  "matmul_params": ef.matmul_params(cfg),
                  "dtype": cfg.dtype, "remat": cfg.remat, "scan_layers": cfg.scan_layers},
        # int8: what --quantize=int8 holds (norms, biases, position tables and the per-channel
        # scales stay float32)
        "weights_bytes": {"fp32": 4 * n, "bf16": 2 * n,
                          "int8": quantization.quantized_bytes(
                              abstract_variables(model)["params"])},
        "run": {"mesh": {"data": sizes.data, "fsdp": sizes.fsdp, "tensor": sizes.tensor},
                "num_devices": sizes.num_devices, "batch_size": batch,
                "rows_per_device": batch // sizes.batch_shards,
                "microbatches": int(config.train.microbatches), "length": s,
                "targets_length": t, "optimizer": config.optimizer.name},
        "memory_per_device": {**mem.as_dict(), "loss_working_set": act["loss"],
                              "layer_backward_working_set": act["layer_backward"]},
        "rule_of_thumb": thumb,
        "flops": {"dense": flops.dense, "attention": flops.attention, "head": flops.head,
                  "forward": flops.forward, "train_step": flops.train,
                  "hardware_step": flops.hardware, "tokens_per_step": flops.tokens,
                  "per_token": flops.per_token,
                  "head_positions": ef.head_positions(cfg, t or s, predictions)},
        "mfu": mfu,
        "compute_optimal": {"tokens_per_param": ef.CHINCHILLA_TOKENS_PER_PARAM,
                            "tokens": budget.tokens, "steps": budget.steps, "flops": budget.flops},
        "accelerators": per_accel,
    }


def not_modelled(config: ml_collections.ConfigDict) -> list[str]:
    """One note per config section the trainer would apply but the estimate leaves out."""
    notes = []
    for name, why in NOT_MODELLED.items():
        section = config.get(name)
        if section is not None and section.get("enabled", True):  # as compression._section
            notes.append(f"the '{name}' section is not modelled: {why}")
    return notes


def check_run_numbers(config: ml_collections.ConfigDict) -> None:
    """The config numbers the plan divides by or multiplies with, checked as the trainer checks
    them (a zero batch would divide by zero, a negative one report negative times)."""
    from t5x_lite.training.run_checks import check_loop_numbers

    check_loop_numbers(config, EstimateError)
    s, t = sequence_lengths(config)
    names = {"t5": ("data.inputs_length", "data.targets_length"),
             "bert": ("data.inputs_length",)}.get(config.model.family, ("data.seq_len",))
    for key, value in zip(names, (s, t)):
        if value < 2:  # as DataConfig checks
            raise EstimateError(f"{key} must be >= 2, got {value}")


def verify(config: ml_collections.ConfigDict, mesh: tuple[int, int, int] | None = None) -> dict:
    """Estimate vs XLA's memory_analysis() of the trainer's step compiled on local devices.

    XLA:CPU has no bf16 arithmetic (it computes in f32 and keeps f32 buffers), so on CPU a
    bf16 config is checked as its float32 variant; both sides use the same variant.
    """
    import jax

    from t5x_lite import estimate_xla, partitioning

    checked = config
    if jax.default_backend() == "cpu" and config.model.dtype != "float32":
        checked = estimate_xla.with_overrides(config, dtype="float32")
    mesh = mesh or (int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor))
    sizes = em.resolve_mesh(*mesh, jax.device_count())
    xla = estimate_xla.xla_stats(checked, partitioning.make_mesh(sizes.data, sizes.fsdp,
                                                                  sizes.tensor))
    est = em.estimate_memory(checked, sizes)
    cfg = ModelConfig.from_dict(checked.model)
    flops = ef.step_flops(cfg, int(checked.train.batch_size), *sequence_lengths(checked),
                          LossConfig.for_run(checked).mlm_predictions)
    return {"backend": jax.default_backend(), "dtype_checked": checked.model.dtype,
            "mesh": [sizes.data, sizes.fsdp, sizes.tensor], "xla_peak_bytes": xla.peak,
            "xla_arguments_bytes": xla.arguments, "xla_temporaries_bytes": xla.temporaries,
            "estimate_bytes": est.total, "ratio": est.total / xla.peak,
            "xla_flops_per_device": xla.flops,
            "hardware_flops_per_device": flops.hardware / sizes.num_devices,
            "xla_flops_loops": xla_loops(checked)}


def xla_loops(config: ml_collections.ConfigDict) -> list[str]:
    """The loops of the compiled step whose body `cost_analysis()` counts once, not per trip:
    with any, XLA's FLOPs are a fraction of the step's and not comparable with the estimate."""
    loops = ["scanned layers"] if config.model.scan_layers else []
    if int(config.train.microbatches) > 1:
        loops.append(f"{int(config.train.microbatches)} microbatches")
    return loops


def _size(x: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _seconds(x: float) -> str:
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.3g} ms" if x >= 1e-3 else f"{x * 1e6:.3g} us"


def _days(d: float) -> str:
    if d * 24 < 1:
        return f"{d * 1440:.1f} min"
    return f"{d * 24:.1f} h" if d < 2 else f"{d:,.1f} d"


def per_token_flops(fl: dict) -> dict[str, float]:
    """Training FLOPs per token by kind (3 x the forward FLOPs of each kind / tokens per step)."""
    return {k: 3 * fl[k] / fl["tokens_per_step"] for k in ("dense", "attention", "head")}


def _per_token_terms(m: dict, run: dict, fl: dict) -> str:
    """The per-token line's breakdown, each term computed directly (none as a remainder)."""
    pt = per_token_flops(fl)
    attention = f" + attention {pt['attention']:.4g}"
    n_mm = f"N_mm = {_count(m['matmul_params'])} matmul params"
    if m["family"] == "t5":
        return (f"; a T5 token passes one stack (encoder or decoder), so this is ~half of "
                f"6 x N_mm = {6 * m['matmul_params']:.4g} ({n_mm}); attention "
                f"{pt['attention']:.4g}")
    if m["family"] == "bert":
        return (f" = dense {pt['dense']:.4g} + MLM head {pt['head']:.4g} (on "
                f"{fl['head_positions']} of {run['length']} positions per row; {n_mm}, the head "
                f"counted once)" + attention)
    return f" = 6 x N_mm {pt['dense'] + pt['head']:.4g} ({n_mm})" + attention


def format_report(r: dict, config_name: str = "") -> str:
    """The human-readable report (the default output)."""
    m, run, mem, fl = r["model"], r["run"], r["memory_per_device"], r["flops"]
    mesh = run["mesh"]
    lines = [
        f"t5x_lite estimate {config_name}".rstrip(),
        f"  {m['family']}: {m['params']:,} parameters (formula {m['params_formula']:,}); "
        f"compute {m['dtype']}, remat {m['remat']}, scan_layers {m['scan_layers']}",
        f"  mesh (data, fsdp, tensor) = ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) on "
        f"{run['num_devices']} devices; batch {run['batch_size']} ({run['rows_per_device']} rows "
        f"per device, {run['microbatches']} microbatch(es)); length {run['length']}"
        + (f", targets {run['targets_length']}" if run["targets_length"] else "")
        + f"; optimizer {run['optimizer']}",
        *(f"  NOTE: {note}" for note in r.get("notes", ())),
        "",
        "Parameters by part: " + ", ".join(f"{k} {_count(v)}" for k, v in
                                           m["params_by_part"].items()),
        "Weights: " + "   ".join(f"{k} {_size(v)}" for k, v in r["weights_bytes"].items()),
        "",
        "Training memory per device (estimate)",
    ]
    rows = [("params (fp32)", mem["params"]), ("gradients (fp32)", mem["gradients"]),
            (f"optimizer state ({run['optimizer']})", mem["optimizer"]),
            ("FSDP all-gathered weights", mem["fsdp_gathered"]), ("batch", mem["batch"]),
            ("activations saved for backward", mem["activations_saved"]),
            ("peak working set (loss / remat)", mem["activations_working"])]
    lines += [f"  {name:34s} {_size(v):>11s}" for name, v in rows if v]
    lines.append(f"  {'total':34s} {_size(mem['total']):>11s}")
    thumb = r["rule_of_thumb"]
    share = (mem["activations"] + mem["fsdp_gathered"]) / mem["total"]
    state = mem["params"] + mem["gradients"] + mem["optimizer"]
    lines += [
        f"  rule of thumb: 4 B/param to store = {_size(thumb['store'])}; ~16 B/param to train "
        f"with Adam in fp32 = {_size(thumb['train_adam'])} (~24 B/param = "
        f"{_size(thumb['train_mixed'])} with bf16 copies); the model's real state here is "
        f"{_size(state)} per device.",
        f"    Why the total differs: activations"
        f"{' and gathered weights' if mem['fsdp_gathered'] else ''}"
        f" are {share:.0%} of it and scale with batch x length, not parameters; "
        f"{run['optimizer']} state is {mem['optimizer'] / max(mem['params'], 1):.2g}x the params "
        f"(Adam 2x, factored Adafactor far less); the mesh divides only what it shards.",
        "",
        "FLOPs (matmuls only; train step = 3 x forward; attention = 12 x Tq x Tk x d_attn per "
        "layer and example)",
        f"  per step {fl['train_step']:.4g}  (dense {fl['dense'] / fl['forward']:.0%}, attention "
        f"{fl['attention'] / fl['forward']:.0%}, output head {fl['head'] / fl['forward']:.0%})"
        + (f"; with remat recompute {fl['hardware_step']:.4g}"
           if fl["hardware_step"] != fl["train_step"] else ""),
        f"  per token {fl['per_token']:.4g} over {fl['tokens_per_step']:,} tokens/step"
        + _per_token_terms(m, run, fl),
        "",
        f"Compute-optimal budget (Chinchilla, {r['compute_optimal']['tokens_per_param']} "
        f"tokens/param): {_count(r['compute_optimal']['tokens'])} tokens = "
        f"{r['compute_optimal']['steps']:,.0f} steps = {r['compute_optimal']['flops']:.3g} FLOPs",
        "",
        f"Per accelerator at MFU {r['mfu']:.0%} on {run['num_devices']} devices",
        f"  {'device':8s} {'bf16 peak':>10s} {'HBM':>9s} {'fits':>5s} {'step':>10s} "
        f"{'tokens/s':>10s} {'20N tokens':>11s}",
    ]
    for name, a in r["accelerators"].items():
        lines.append(f"  {name:8s} {a['peak_bf16_flops'] / 1e12:>7.0f} TF "
                     f"{_size(a['memory_bytes']):>9s} {'yes' if a['fits'] else 'NO':>5s} "
                     f"{_seconds(a['step_seconds']):>10s} {_count(a['tokens_per_second']):>10s} "
                     f"{_days(a['compute_optimal_days']):>11s}")
    if "verify" in r:
        v = r["verify"]
        lines += ["", f"Check on this machine ({v['backend']}, {v['dtype_checked']}, mesh "
                      f"{tuple(v['mesh'])}): XLA memory_analysis peak {_size(v['xla_peak_bytes'])}"
                      f" vs estimate {_size(v['estimate_bytes'])} (ratio {v['ratio']:.3f}); "
                      f"XLA cost_analysis {v['xla_flops_per_device']:.4g} FLOPs/device vs "
                      f"{v['hardware_flops_per_device']:.4g} matmul FLOPs"]
        if v["xla_flops_loops"]:
            lines.append(f"  NOTE: not comparable: XLA's cost_analysis counts a loop body once "
                         f"(here: {' and '.join(v['xla_flops_loops'])}), not once per trip, so "
                         f"its FLOPs fall short of the step's; check FLOPs with scan_layers=False "
                         f"and train.microbatches=1")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        cli.exit_with("estimate", f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        cli.exit_with("estimate", "--config is required (e.g. --config=configs/t5_small.py)")
    config = _CONFIG.value
    try:
        mesh = parse_mesh(MESH.value) if MESH.value else None
        num_devices = _NUM_DEVICES.value
        if num_devices is None and -1 in (mesh or (config.mesh.data, config.mesh.fsdp,
                                                   config.mesh.tensor)):
            import jax
            num_devices = jax.device_count()
        result = estimate(config, mesh=mesh, num_devices=num_devices, mfu=_MFU.value,
                          accelerators=_ACCELERATORS.value)
        if _VERIFY.value:
            result["verify"] = verify(config, mesh)
    except cli.ERRORS as e:
        cli.exit_with("estimate", e)
    if _JSON.value:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result, flags.FLAGS["config"].serialize().split("=", 1)[-1]))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("estimate"))
