"""LoRA: low-rank adapters on chosen projection kernels, trained while the base stays frozen.

For each projection kernel W whose path matches `targets` (e.g. `query|value`), the adapters
are A [*in, r] (normal, std 1/sqrt(fan_in)) and B [r, *out] (zeros, so training starts at the
base model), and the effective kernel is W + (alpha / r) * A @ B. The pattern is matched against
projection-kernel paths only: biases (also the 2-D per-head query_bias of use_bias models, GPT-2
and BERT), norm scales and relative-position tables are never targets, so `query|value` needs no
anchoring. The merge happens inside the jitted loss from the frozen base and the trainable
adapters: the base is never copied, the optimizer state exists only for the adapters, and
checkpoints hold only the adapters.

    python -m t5x_lite.train --config=configs/lora_tiny_t5.py --workdir=/tmp/lora \\
        --config.lora.base=/tmp/tiny_t5
    python -m t5x_lite.lora --workdir=/tmp/lora --output=/tmp/lora_merged   # fold into base

`t5x_lite.load` (and so evaluate / infer) merges a LoRA workdir's adapters into its base, at
the base step the run started from (`lora.base_step`, recorded in its config.json at the first
start): a base that trains on does not change what the adapters apply to.

Sharding: A gets the kernel's input logical axes + None, B gets None + the output axes (a
leading `layers` axis of scanned stacks stays on both).

Dropout (`lora.dropout`): because the adapter is merged into the kernel, the dropout mask is on
the adapter's input features (rows of A), one mask per step and layer, not per token as in PEFT's
`lora_dropout`; a per-token mask would need a separate adapter matmul in every layer (a model
change).

Shape legend: L layers (scanned stacks only), I input features (flattened), O output features
(flattened), r rank.
"""
from __future__ import annotations

import dataclasses
import math
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

from t5x_lite import checkpoints, cli, compression, files, partitioning
from t5x_lite.config import ModelConfig
from t5x_lite.models import abstract_variables, build_model

ADAPTER_A, ADAPTER_B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The run config's `lora` section."""

    base: str = ""  # base checkpoint: workdir, its checkpoints/ or checkpoints/<step>
    base_step: int = -1  # the base's step the adapters apply to; -1: pinned at the first start
    # regex (re.search) over projection-kernel paths (never biases), e.g. 'query|value|wi'
    targets: str = "query|value"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank <= 0:
            raise compression.CompressionError(f"lora.rank must be positive, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):  # 0: the update is always 0
            raise compression.CompressionError(f"lora.alpha must be a finite number > 0, got "
                                               f"{self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise compression.CompressionError(f"lora.dropout must be in [0, 1), got "
                                               f"{self.dropout}")
        compression.check_pattern(self.targets, "lora.targets")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d) -> "LoraConfig":
        return compression.section_config(cls, d, "lora")


def _target_kernels(axes, targets: str) -> dict[str, compression.KernelDims]:
    """{path: KernelDims} of the projection kernels whose path matches `targets`
    (`compression.target_kernels`: `query|value` adapts the query and value kernels and not
    the query_bias / value_bias beside them, GPT-2's and BERT's)."""
    found = compression.target_kernels(compression.axes_by_path(axes), targets, "lora.targets")
    dims = {p: compression.kernel_dims(p, a) for p, a in found.items()}
    for p, d in dims.items():
        if d.batch + d.inputs + d.outputs != tuple(range(len(found[p]))):
            raise compression.CompressionError(f"{p}: LoRA needs kernels laid out as "
                                               f"[layers?, inputs, outputs], got axes {found[p]}")
    return dims


def init_adapters(rng, boxed_params, cfg: LoraConfig):
    """Boxed (nn.Partitioned) adapters {path...: {'lora_a', 'lora_b'}} for the target kernels."""
    axes = compression.logical_axes(boxed_params)
    axes_flat = compression.axes_by_path(axes)
    shapes = compression.flat(nn.meta.unbox(boxed_params))
    out = {}
    for i, (path, d) in enumerate(sorted(_target_kernels(axes, cfg.targets).items())):
        shape, names = shapes[path].shape, axes_flat[path]
        b_shape = tuple(shape[j] for j in d.batch)
        in_shape = tuple(shape[j] for j in d.inputs)
        out_shape = tuple(shape[j] for j in d.outputs)
        b_names = tuple(names[j] for j in d.batch)
        std = 1.0 / math.sqrt(math.prod(in_shape))
        a = std * jax.random.normal(jax.random.fold_in(rng, i), b_shape + in_shape + (cfg.rank,))
        out[f"{path}/{ADAPTER_A}"] = nn.LogicallyPartitioned(
            a, b_names + tuple(names[j] for j in d.inputs) + (None,))
        out[f"{path}/{ADAPTER_B}"] = nn.LogicallyPartitioned(
            jnp.zeros(b_shape + (cfg.rank,) + out_shape, jnp.float32),
            b_names + (None,) + tuple(names[j] for j in d.outputs))
    return compression.nested(out)


def delta(a, b, batch_ndim: int, kernel_shape):
    """(A @ B) reshaped to the kernel: A [*L, *in, r], B [*L, r, *out] -> [*L, *in, *out]."""
    lead = a.shape[:batch_ndim]
    a_LxIxr = a.reshape(lead + (-1, a.shape[-1]))
    b_LxrxO = b.reshape(lead + (b.shape[batch_ndim], -1))
    return jnp.matmul(a_LxIxr, b_LxrxO).reshape(kernel_shape)


def merge(base, adapters, cfg: LoraConfig, *, dropout_rng=None):
    """Base params with every adapted kernel replaced by W + (alpha/r) A @ B (same dtype as W).

    With `dropout_rng` and cfg.dropout > 0, rows of A (the adapter's input features) are dropped
    and the rest rescaled by 1/(1-p): one mask per step and kernel.
    """
    base_flat = compression.flat(base)
    new = {}
    for i, (path, ad) in enumerate(sorted(_adapter_pairs(adapters).items())):
        w = base_flat[path]
        a, b = ad[ADAPTER_A], ad[ADAPTER_B]
        if dropout_rng is not None and cfg.dropout > 0:
            keep = 1.0 - cfg.dropout
            mask = jax.random.bernoulli(jax.random.fold_in(dropout_rng, i), keep,
                                        a.shape[:-1] + (1,))
            a = jnp.where(mask, a / keep, 0.0)
        batch_ndim = a.ndim + b.ndim - 2 - w.ndim
        new[path] = (w + cfg.scale * delta(a, b, batch_ndim, w.shape)).astype(w.dtype)
    return compression.replace_leaves(base, new)


def _adapter_pairs(adapters) -> dict[str, dict]:
    pairs: dict[str, dict] = {}
    for path, x in compression.flat(adapters).items():
        kernel, name = path.rsplit("/", 1)
        pairs.setdefault(kernel, {})[name] = x
    return pairs


class LoraModel(compression.ModelWrapper):
    """A model whose params are {'base': frozen, 'lora': adapters}; merges inside every call."""

    def __init__(self, inner, cfg: LoraConfig):
        super().__init__(inner)
        self.lora = cfg
        if cfg.dropout > 0 and inner.config.dropout_rate == 0:
            # The trainer passes a dropout key only when config.dropout_rate > 0; report the
            # adapter dropout there (the wrapped network keeps its own config, rate 0 = no-op).
            self.config = dataclasses.replace(inner.config, dropout_rate=cfg.dropout)

    def init(self, rng, batch=None):
        base = self.inner.init(rng, batch)["params"]
        return {"params": {"base": base,
                           "lora": init_adapters(jax.random.fold_in(rng, 1), base, self.lora)}}

    def merged(self, params, rng=None):
        return merge(jax.lax.stop_gradient(params["base"]), params["lora"], self.lora,
                     # a key of its own, independent of the network's dropout masks
                     dropout_rng=None if rng is None else jax.random.fold_in(rng, 0x10A))

    def loss_fn(self, params, batch, rng=None, *, normalizer=None):
        return self.inner.loss_fn(self.merged(params, rng), batch, rng, normalizer=normalizer)

    def logits(self, params, batch, *, rng=None, deterministic: bool = True):
        return self.inner.logits(self.merged(params, None if deterministic else rng), batch,
                                 rng=rng, deterministic=deterministic)

    def score_batch(self, params, batch):
        return self.inner.score_batch(self.merged(params), batch)


def _check_base_config(base_workdir, model_cfg: ModelConfig) -> None:
    base_cfg = ModelConfig.from_dict(checkpoints.read_config(base_workdir).model)
    diffs = base_cfg.differences(model_cfg)  # "name: base's vs run's"
    if diffs:
        raise compression.CompressionError(f"The LoRA run's model differs from its base "
                                           f"{base_workdir}: {'; '.join(diffs[:3])} (base vs "
                                           "run)")


def _require_base(cfg: LoraConfig) -> None:
    if not cfg.base:
        raise compression.CompressionError("lora.base is required: the checkpoint whose "
                                           "weights the adapters fine-tune")


def base_checkpoint(cfg: LoraConfig) -> tuple[epath.Path, int]:
    """(workdir, step) of the base the adapters apply to: lora.base_step of lora.base, or the
    step lora.base names (its latest) while none is pinned."""
    _require_base(cfg)
    return compression.frozen_checkpoint(
        cfg.base, cfg.base_step, f"The LoRA adapters apply to step {cfg.base_step} of their base")


def pin_base_step(config, workdir=None) -> LoraConfig:
    """The run's LoraConfig with `base_step` pinned (`compression.pin_frozen_step`): the step
    in `workdir`'s config.json, else the one `config` names, else the base's step now."""
    _require_base(LoraConfig.from_dict(config.lora))
    compression.pin_frozen_step(
        config, "lora", "base", "base_step", workdir,
        "the adapters in {workdir} were trained on step {pinned} of base {path}; keep it, or "
        "train new adapters in a new --workdir (train.init_from={workdir} starts them from "
        "these)")
    return LoraConfig.from_dict(config.lora)


class LoraPlugin(compression.FrozenTrainablePlugin):
    frozen_key, trainable_key = "base", "lora"

    def __init__(self, cfg: LoraConfig, mesh, rules):
        super().__init__(mesh, rules)
        self.cfg = cfg
        self.frozen_from = base_checkpoint(cfg)

    def wrap_model(self, model):
        _check_base_config(self.frozen_from[0], model.config)
        wrapped = LoraModel(model, self.cfg)
        boxed = jax.eval_shape(lambda: wrapped.init(jax.random.key(0)))["params"]
        n_lora = compression.param_count(nn.meta.unbox(boxed["lora"]))
        n_base = compression.param_count(nn.meta.unbox(boxed["base"]))
        logging.info("LoRA r=%d alpha=%g on %r: %d trainable params (%.3f%% of the %d base "
                     "params)", self.cfg.rank, self.cfg.alpha, self.cfg.targets, n_lora,
                     100.0 * n_lora / n_base, n_base)
        return wrapped

    def init_trainable(self, rng):
        return self.model.init(rng)["params"]["lora"]


def is_lora_run(run_config) -> bool:
    section = run_config.get("lora") if hasattr(run_config, "get") else None
    return section is not None and section.get("enabled", True) and bool(section.get("base"))


def restore_params(workdir, step: int, run_config, abstract_params):
    """A checkpoint's inference params: plain, or for a LoRA workdir its base with the adapters
    merged in (what `t5x_lite.load` uses, so evaluate / infer work on LoRA workdirs).

    Args:
      abstract_params: ShapeDtypeStructs (with shardings) of the plain model params.
    """
    if not is_lora_run(run_config):
        return checkpoints.restore_params(workdir, step, abstract_params)
    cfg = LoraConfig.from_dict(run_config.lora)
    base = checkpoints.restore_params(*base_checkpoint(cfg), abstract_params)
    boxed = abstract_variables(build_model(ModelConfig.from_dict(run_config.model)))["params"]
    boxed_adapters = jax.eval_shape(lambda: init_adapters(jax.random.key(0), boxed, cfg))
    mesh = jax.tree.leaves(abstract_params)[0].sharding.mesh
    rules = partitioning.rules_from_config(run_config.get("mesh", {}).get("rules"))
    adapters = checkpoints.restore_params(workdir, step, checkpoints.abstract_with_shardings(
        nn.meta.unbox(boxed_adapters), partitioning.shardings(boxed_adapters, mesh, rules)))
    return jax.jit(lambda b, a: merge(b, a, cfg), donate_argnums=0)(base, adapters)


def check_merge_output(output, workdir, base) -> epath.Path:
    """`output` as the new directory of a merged checkpoint. Refuses (CompressionError) a file,
    the LoRA workdir, its base, a path inside either's checkpoints/, and a directory that is not
    empty (another workdir, an earlier merge), and an empty --output (the current directory)."""
    if not str(output).strip():
        raise compression.CompressionError("--output is empty; give the merged checkpoint a "
                                           "new directory")
    out = checkpoints.local_or_remote(output)
    if out.exists() and not out.is_dir():
        raise compression.CompressionError(f"--output {out} is a file, not a directory")
    blocking = files.file_in_the_way(out)
    if blocking:
        raise compression.CompressionError(f"--output {out}: its parent {blocking} is a file")
    target = files.real(out)
    for what, directory in (("the LoRA workdir", workdir), ("the LoRA run's base", base)):
        ckpts = files.real(directory) / checkpoints.CHECKPOINT_DIR
        if target == ckpts.parent:
            raise compression.CompressionError(f"--output {out} is {what}; give the merged "
                                               "checkpoint a new directory")
        if target == ckpts or ckpts in target.parents:
            raise compression.CompressionError(f"--output {out} is inside the "
                                               f"{checkpoints.CHECKPOINT_DIR}/ of {what}; give "
                                               "the merged checkpoint a new directory")
    if out.exists() and any(out.iterdir()):
        kind = ("a t5x_lite workdir" if (out / checkpoints.CONFIG_FILE).exists()
                or (out / checkpoints.CHECKPOINT_DIR).exists() else "not empty")
        raise compression.CompressionError(f"--output {out} is {kind}; give the merged "
                                           "checkpoint a new (or empty) directory")
    return out


def merge_workdir(workdir, output, step: int | None = None) -> int:
    """Writes a plain (merged) checkpoint of a LoRA run to the new directory `output` (built
    beside it and renamed into place: a failure leaves no output); returns its step."""
    # on use: the HF side is not needed otherwise
    from t5x_lite.hf_interop import GENERATION_SOURCE_CONFIG, HF_SOURCE_CONFIG

    src, found = checkpoints.resolve(workdir)
    step = found if step is None else step
    run = checkpoints.read_config(src)
    if not is_lora_run(run):
        raise compression.CompressionError(f"{src} is not a LoRA run (no lora.base in its config)")
    base, _ = base_checkpoint(LoraConfig.from_dict(run.lora))
    out = check_merge_output(output, src, base)
    checkpoints.check_step(src, step)
    model = build_model(ModelConfig.from_dict(run.model))
    boxed = abstract_variables(model)["params"]
    mesh = partitioning.make_mesh()
    abstract = checkpoints.abstract_with_shardings(
        nn.meta.unbox(boxed), partitioning.shardings(boxed, mesh))
    params = restore_params(src, step, run, abstract)
    merged_run = run.to_dict()
    merged_run.pop("lora")
    merged_run.setdefault("train", {})["init_from"] = ""
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        checkpoints.write_config(tmp, merged_run)
        # The vocabulary the run trained with; the HF configs of a converted base (`convert
        # --to_hf` writes back its token ids, extra fields and generation settings).
        for name, dirs in ((checkpoints.VOCAB_FILE, (src,)), (HF_SOURCE_CONFIG, (src, base)),
                           (GENERATION_SOURCE_CONFIG, (src, base))):
            source = next((d / name for d in dirs if (d / name).exists()), None)
            if source is not None:
                (tmp / name).write_bytes(source.read_bytes())
        checkpoints.save_params(tmp, params, step)
        if out.exists():
            out.rmdir()  # empty (checked): the rename puts the merged directory in its place
        tmp.rename(out)
    finally:
        if tmp.exists():
            tmp.rmtree()
    return step


def main(argv):
    from absl import flags

    f = flags.FLAGS
    if not f["verbosity"].present:
        cli.quiet_console(logging.WARNING)  # orbax logs a page per restore / save at INFO
    if len(argv) > 1:
        cli.exit_with("lora", f"unexpected arguments {argv[1:]}")
    try:
        step = merge_workdir(f.workdir, f.output, f.step)
    except cli.ERRORS as e:
        cli.exit_with("lora", e)
    print(f"lora: merged adapters of {f.workdir} (step {step}) into {f.output}")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("workdir", None, "LoRA run workdir (or checkpoint step dir).",
                        required=True)
    flags.DEFINE_string("output", None, "New (or empty) directory for the merged plain "
                        "checkpoint.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    app.run(main, flags_parser=cli.flags_parser("lora"))
