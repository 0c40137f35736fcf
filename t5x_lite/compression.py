"""What LoRA, INT8 quantization, distillation and pruning share, and the trainer's one entry.

`from_config(config, mesh, rules, workdir)` turns a run config's optional `lora`, `distill` and
`prune` sections into a `Plugin` the trainer calls at four places (see README.md):

    model, tx = plugin.wrap(model, tx)          # params tree / optimizer as the method needs
    plugin.checkpointed(params)                 # the part of the params a checkpoint holds
    plugin.full_params(checkpointed, rng)       # ... and back (re-attaching frozen weights)

Without those sections the plugin is the identity and the trainer behaves as before.

LoRA and distillation train a *frozen + trainable* params tree `{frozen_key: ..., trainable_key:
...}` (base + adapters, teacher + student): both halves must be arguments of the jitted step (a
closed-over array would be baked into the executable as a constant), so they live in the train
state side by side. `freeze_optimizer` gives the optimizer only the trainable half, so optimizer
state exists only for it, and the frozen half gets a `-0.0` update (x + -0.0 == x bit for bit,
also for x = -0.0), which XLA folds away; the donated frozen buffers are aliased to the output.
Checkpoints hold only the trainable half.

Kernel layout (`kernel_dims`): which dimensions of a projection kernel are its inputs
(contracted with the activations) and which its outputs, from the parameter's name and its
logical axis names: `out` [heads, kv, embed] and `wo` [mlp, embed] contract heads/kv and mlp;
every other kernel (query/key/value [embed, heads, kv], wi* [embed, mlp], lm_head [embed, vocab],
the token embedding [vocab, embed] used by `attend`) contracts `embed`. A leading `layers` axis
(scan_layers) is a batch dimension.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t5x_lite import checkpoints, files, partitioning
from t5x_lite.config import ConfigError

INPUT_AXES = {"out": ("heads", "kv"), "wo": ("mlp",)}
DEFAULT_INPUT_AXES = ("embed",)


class CompressionError(ConfigError):
    """A compression setting that cannot be used (one-line, user-facing message). A ConfigError,
    so the entry points that report bad configs in one line report these too."""


def section_config(cls, section, name: str):
    """A frozen config dataclass from a run-config section (dict or ConfigDict); an `enabled`
    key is accepted and ignored; unknown keys are an error naming the section."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    d.pop("enabled", None)
    known = {f.name for f in dataclasses.fields(cls)}
    if set(d) - known:
        raise CompressionError(f"Unknown {name} option(s) {sorted(set(d) - known)}; known: "
                               f"{sorted(known)}")
    for f in dataclasses.fields(cls):  # a wrong type fails here, not as a TypeError later
        if f.name in d:
            d[f.name] = _typed(d[f.name], type(f.default), f"{name}.{f.name}")
    return cls(**d)


def _typed(value, kind: type, key: str):
    """`value` as `kind` (bool / int / float / str; an int is a float too), else one line."""
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
          float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(kind)
    if ok is None:
        return value
    if not ok(value):
        raise CompressionError(f"{key} must be {kind.__name__}, got {value!r}")
    return kind(value)


def check_pattern(pattern: str, key: str) -> None:
    """Raises CompressionError when `pattern` (the setting `key`) is not a valid regex."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise CompressionError(f"{key}={pattern!r} is not a valid regular expression: {e}"
                               ) from None


def _is_bias(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name == "bias" or name.endswith("_bias")


def projection_kernels(by_path: dict[str, tuple]) -> dict[str, tuple]:
    """{path: axes} of the projection kernels among `axes_by_path`' params (>= 2 dims, an input
    and an output dimension, `kernel_dims`). Biases (also the 2-D per-head query_bias [heads,
    kv] of use_bias models), norm scales and relative-position tables are not."""
    def is_kernel(path, axes):
        if len(axes) < 2 or _is_bias(path):
            return False
        try:
            kernel_dims(path, axes)
        except CompressionError:
            return False
        return True
    return {p: a for p, a in by_path.items() if is_kernel(p, a)}


def target_kernels(by_path: dict[str, tuple], pattern: str, key: str) -> dict[str, tuple]:
    """{path: axes} of the projection kernels whose path matches `pattern` (re.search), the
    setting `key` (LoRA's and unstructured pruning's targets). The pattern is matched against
    kernel paths only; one that matches no kernel, or that names a param that is not one
    (matches its whole path or name, e.g. 'query_bias' or 'query|query_bias'), is an error."""
    kernels = projection_kernels(by_path)
    named = sorted(p for p in by_path if p not in kernels and (
        re.fullmatch(pattern, p) or re.fullmatch(pattern, p.rsplit("/", 1)[-1])))
    if named:
        raise CompressionError(
            f"{key}={pattern!r} names {named[:3]}, which are not projection kernels (biases, "
            "norm scales and relative-position tables never are); kernel paths look like "
            f"{sorted(kernels)[:3]}")
    found = {p: a for p, a in kernels.items() if re.search(pattern, p)}
    if not found:
        raise CompressionError(f"{key}={pattern!r} matches no kernel; kernel paths look like "
                               f"{sorted(kernels)[:3]}")
    return found


# --------------------------------------------------------------------------- params trees


def path_str(path) -> str:
    """'encoder/layers_0/self_attention/query' for a tree_util key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(boxed_params) -> Any:
    """Tree of tuples of logical axis names (one per dim) for a boxed (nn.Partitioned) tree."""
    specs = nn.get_partition_spec(boxed_params)
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def select(tree, pattern: str) -> dict[str, Any]:
    """{path: leaf} of the leaves whose '/'-joined path matches `pattern` (re.search)."""
    regex = re.compile(pattern)
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if regex.search(path_str(p))}


def nested(flat: dict[str, Any]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    out: dict = {}
    for path, x in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = x
    return out


def flat(tree, is_leaf=None) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf)[0]}


def axes_by_path(axes) -> dict[str, tuple]:
    """{path: axis names} from a `logical_axes` tree (its leaves are tuples)."""
    return flat(axes, is_leaf=lambda x: isinstance(x, tuple))


def replace_leaves(tree, new: dict[str, Any]):
    """`tree` with the leaves at the '/'-paths in `new` replaced."""
    return jax.tree_util.tree_map_with_path(lambda p, x: new.get(path_str(p), x), tree)


class KernelDims(NamedTuple):
    batch: tuple[int, ...]  # leading `layers` dims (scan_layers)
    inputs: tuple[int, ...]  # contracted with the activations
    outputs: tuple[int, ...]


def kernel_dims(path: str, axes: tuple) -> KernelDims:
    """Batch / input / output dimensions of a projection kernel (see the module docstring)."""
    name = path.rsplit("/", 1)[-1]
    in_names = INPUT_AXES.get(name, DEFAULT_INPUT_AXES)
    batch = tuple(i for i, a in enumerate(axes) if a == "layers")
    inputs = tuple(i for i, a in enumerate(axes) if a in in_names and i not in batch)
    outputs = tuple(i for i in range(len(axes)) if i not in batch and i not in inputs)
    if not inputs or not outputs:
        raise CompressionError(f"{path} with axes {axes} is not a projection kernel (no input or "
                               "output dimension); narrow the target pattern")
    return KernelDims(batch, inputs, outputs)


def param_bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def param_count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- frozen + trainable


def freeze_optimizer(tx: optax.GradientTransformation, trainable_key: str
                     ) -> optax.GradientTransformation:
    """`tx` applied to params[trainable_key] only; every other subtree gets a -0.0 update.

    The inner state is kept under `{trainable_key: ...}` so its leaves' key paths are the
    trainable params' paths (the trainer derives optimizer-state shardings from those).
    """
    def init(params):
        return {trainable_key: tx.init(params[trainable_key])}

    def update(grads, state, params=None):
        sub = None if params is None else params[trainable_key]
        updates, inner = tx.update(grads[trainable_key], state[trainable_key], sub)
        out = {k: (updates if k == trainable_key else
                   jax.tree.map(lambda g: jnp.full_like(g, -0.0), v)) for k, v in grads.items()}
        return out, {trainable_key: inner}

    return optax.GradientTransformation(init, update)


class Plugin:
    """Identity: the trainer's default. Subclasses change the params tree and the optimizer."""

    def wrap(self, model, tx):
        return model, tx

    def checkpointed(self, params):
        return params

    def full_params(self, params, rng):
        del rng
        return params


class FrozenTrainablePlugin(Plugin):
    """Shared by LoRA (base + adapters) and distillation (teacher + student).

    Subclasses set `frozen_key`, `trainable_key` and implement `wrap_model(model)` (returning a
    model whose params are the two-key tree, and setting `frozen_from`: the (workdir, step) of
    the frozen half's checkpoint) and `init_trainable(rng)` (boxed trainable variables, as from
    `model.init`).
    """

    frozen_key = "frozen"
    trainable_key = "trainable"

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules
        self.model = None
        self.boxed = None  # the wrapped model's abstract (boxed) params, set by `wrap`
        self.frozen_from = None

    def wrap(self, model, tx):
        self.model = self.wrap_model(model)
        self.boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0)))["params"]
        # A checkpoint that cannot be the frozen half (e.g. a LoRA run's adapters) fails here,
        # before the trainer makes the workdir.
        checkpoints.check_params_match(*self.frozen_from,
                                       nn.meta.unbox(self.boxed[self.frozen_key]))
        return self.model, freeze_optimizer(tx, self.trainable_key)

    def checkpointed(self, params):
        return params[self.trainable_key]

    def full_params(self, params, rng):
        shardings = partitioning.shardings(self.boxed, self.mesh, self.rules)
        abstract = nn.meta.unbox(self.boxed)
        frozen = checkpoints.restore_params(*self.frozen_from, checkpoints.abstract_with_shardings(
            abstract[self.frozen_key], shardings[self.frozen_key]))
        if params is None:
            with partitioning.activate(self.mesh, self.rules):
                params = jax.jit(lambda r: nn.meta.unbox(self.init_trainable(r)),
                                 out_shardings=shardings[self.trainable_key])(rng)
        return {self.frozen_key: frozen, self.trainable_key: params}

    def wrap_model(self, model):
        raise NotImplementedError

    def init_trainable(self, rng):
        raise NotImplementedError


def frozen_checkpoint(path: str, step: int, what: str):
    """(workdir, step) of a frozen half's checkpoint: `step` of the workdir `path` names, or
    while none is pinned (step < 0) the step `path` names (its latest). `what` names the frozen
    half in the error, e.g. "The LoRA adapters apply to step 3 of their base"."""
    workdir, named = checkpoints.resolve(path)
    if step < 0:
        return workdir, named
    steps = checkpoints.all_steps(workdir)
    if step not in steps:
        raise CompressionError(f"{what} {workdir}, which no longer has it (available: {steps}); "
                               "restore that checkpoint, or start a new run")
    return workdir, step


def pin_frozen_step(config, section: str, path_key: str, step_key: str, workdir,
                    trained_on: str) -> int:
    """The step of `config[section][path_key]`'s checkpoint a run's frozen half comes from,
    written into `config[section][step_key]` (so the run's config.json and checkpoints keep it):
    the step in `workdir`'s config.json (a resumed run), else the one `config` names, else that
    checkpoint's step now (the first start). Resuming then uses the same frozen weights even
    when their run has saved later steps since. That the step still exists is checked where it
    is used (`frozen_checkpoint`). A `config` step, another workdir in `config`'s path, or a
    step that path names, that contradicts the saved one is refused: `trained_on` (formatted
    with `pinned`, `path` (the saved path) and `workdir`) says what the workdir holds. The path
    is written back absolute (the saved one on a resume)."""
    step = int(config[section].get(step_key, -1))
    run = None if workdir is None else checkpoints.saved_config(workdir)
    saved = None if run is None else run.get(section)
    pinned = int(saved.get(step_key, -1)) if hasattr(saved, "get") else -1
    path = config[section][path_key]
    if pinned >= 0:
        was = saved.get(path_key) or path
        now, named = checkpoints.split_path(path)
        if 0 <= step != pinned:
            clash = f"{section}.{step_key}={step}"
        elif (files.real(checkpoints.split_path(was)[0]) != files.real(now)
              or named not in (None, pinned)):
            clash = f"{section}.{path_key}={path}"
        else:
            clash = None
        if clash:
            raise CompressionError(f"{clash}, but " + trained_on.format(
                pinned=pinned, path=was, workdir=workdir))
        step = pinned
        path = was
    elif step < 0:
        step = checkpoints.resolve(path)[1]
    with config.unlocked():
        config[section][step_key] = step
        # Absolute: a relative path would be read against wherever a later evaluate, infer,
        # load or resume runs, and could name another workdir there.
        config[section][path_key] = os.fspath(checkpoints.local_or_remote(path))
    return step


class ModelWrapper:
    """Delegates everything a `models.BaseModel` offers to `inner`; subclasses override the
    params-taking methods (`init`, `loss_fn`, `logits`, `score_batch`)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _section(config, name):
    section = config.get(name) if hasattr(config, "get") else None
    return section if section is not None and section.get("enabled", True) else None


def from_config(config, mesh, rules, workdir=None) -> Plugin:
    """The plugin for a run config's `lora` / `distill` / `prune` sections (identity if none).

    The step of a LoRA run's base (lora.base_step) and of a distillation's teacher
    (distill.teacher_step) is pinned (`pin_frozen_step`): the one recorded in `workdir`'s
    config.json, else the checkpoint's step now, written into `config` so the run keeps it.

    Raises:
      CompressionError: an unsupported combination (LoRA with distillation or pruning); a
        resume of `workdir` whose latest checkpoint was trained with other `prune` settings
        (its masks are in the optimizer state).
    """
    lora_cfg = _section(config, "lora")
    distill_cfg = _section(config, "distill")
    prune_cfg = _section(config, "prune")
    active = [n for n, c in (("lora", lora_cfg), ("distill", distill_cfg), ("prune", prune_cfg))
              if c is not None]
    if "lora" in active and len(active) > 1:
        raise CompressionError(f"LoRA cannot be combined with {active[1:]} (train adapters on a "
                               "pruned / distilled checkpoint instead)")
    # Imported on use: each method pulls in only what it needs.
    if lora_cfg is not None:
        from t5x_lite import lora
        return lora.LoraPlugin(lora.pin_base_step(config, workdir), mesh, rules)
    from t5x_lite import pruning
    prune = pruning.PruneConfig.from_dict(prune_cfg) if prune_cfg is not None else None
    # the checkpoint's masks: the same settings
    pruning.check_resume(prune, workdir, int(config.train.num_steps))
    plugin = Plugin()
    if prune is not None:
        plugin = pruning.PruningPlugin(prune, int(config.train.num_steps))
    if distill_cfg is not None:
        from t5x_lite import distillation
        plugin = distillation.DistillPlugin(distillation.pin_teacher_step(config, workdir),
                                            mesh, rules, inner=plugin, data=config.get("data"))
    return plugin
