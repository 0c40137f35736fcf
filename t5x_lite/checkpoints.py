"""Workdir layout and orbax checkpoint I/O shared by train, convert, evaluate, infer and `load`.

    WORKDIR/config.json                 the full run config (model, train, data, ...)
    WORKDIR/vocab.model                 sentencepiece model, when the run has one
    WORKDIR/checkpoints/<step>/params   orbax item: the float32 params tree
    WORKDIR/checkpoints/<step>/opt_state, .../data, .../config
                                        (training only: optimizer state, grain iterator state,
                                         the run config as JSON)

A checkpoint path given by a user may be the workdir (latest step), `WORKDIR/checkpoints`, or
one step directory `WORKDIR/checkpoints/<step>`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from t5x_lite import files
from t5x_lite.errors import UserError

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.model"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(UserError):
    """A checkpoint path or content that cannot be used."""


class OptimizerStateMismatch(CheckpointError):
    """A training checkpoint whose optimizer state another optimizer setup wrote."""


class DataStateMismatch(CheckpointError):
    """A training checkpoint whose data iterator state another data pipeline wrote (the data
    config changed: another objective, packing, a mixture); params and optimizer state are
    fine."""


def local_or_remote(path) -> epath.Path:
    """A user-given path as an epath.Path, made absolute when it is a relative local path
    (orbax refuses relative checkpoint paths, and only says so when it first saves)."""
    text = os.fspath(path)
    if files.is_remote(text):
        files.check_remote(text)  # gs:// without gcsfs: one line
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def write_config(workdir, config: ml_collections.ConfigDict | dict) -> None:
    """Writes config.json atomically (temp file + rename); only call from process 0."""
    workdir = local_or_remote(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    files.write_atomic(workdir / CONFIG_FILE,  # re-runs replace it
                       json.dumps(d, indent=2, sort_keys=True, default=_json_default))


def _json_default(x):
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"Cannot write {type(x).__name__} to config.json")


def read_config(workdir) -> ml_collections.ConfigDict:
    path = local_or_remote(workdir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"No {CONFIG_FILE} in {workdir}: not a t5x_lite workdir")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise CheckpointError(f"{path} is not a t5x_lite run config (a JSON object with a "
                              "'model' section)")
    return ml_collections.ConfigDict(d)


def saved_config(workdir) -> ml_collections.ConfigDict | None:
    """`read_config`, or None when `workdir` has no config.json yet (a new run)."""
    return read_config(workdir) if (local_or_remote(workdir) / CONFIG_FILE).exists() else None


TRAIN_ITEMS = ("params", "opt_state", "data", "config")


def make_manager(workdir, *, keep: int | None = None, async_save: bool = False,
                 item_names=("params", "opt_state", "data")) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(local_or_remote(workdir) / CHECKPOINT_DIR, options=options,
                                 item_names=item_names)


def split_path(path) -> tuple[epath.Path, int | None]:
    """A user-given checkpoint path -> (workdir, the step it names or None), by its spelling
    only: `W`, `W/checkpoints` or `W/checkpoints/N`."""
    path = local_or_remote(path)
    if path.name.isdigit() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent, int(path.name)
    return (path.parent if path.name == CHECKPOINT_DIR else path), None


def resolve(path) -> tuple[epath.Path, int]:
    """A user-given checkpoint path -> (workdir, step): the step it names, else its latest
    (as process 0 lists it; call this on every process). Raises CheckpointError."""
    path = local_or_remote(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint path {path} does not exist")
    workdir, step = split_path(path)
    if step is not None:
        return workdir, step
    steps = agreed_steps(workdir)
    if not steps:
        raise CheckpointError(f"No checkpoint found in {workdir}")
    return workdir, steps[-1]


def check_step(workdir, step: int) -> int:
    """`step` if `workdir` has a complete checkpoint for it, else one CheckpointError line."""
    steps = all_steps(workdir)
    if step not in steps:
        raise CheckpointError(f"No checkpoint for step {step} in {workdir}; available: {steps}")
    return step


def agreed_steps(workdir) -> list[int]:
    """`all_steps` as process 0 lists it, on every process (call it on all of them): another
    process listing a moment later could see a step a trainer has saved in between, and
    restore other weights than process 0 for the same model."""
    from t5x_lite import distributed

    return distributed.agree_list(all_steps(workdir))


def all_steps(workdir) -> list[int]:
    """Steps of complete checkpoints, as orbax decides it for the file system: on a local
    disk it writes a temp dir and renames it when finished; on GCS it writes the step dir in
    place and adds commit_success.txt last, so a step dir without it is still being written
    (or was cut short by a kill)."""
    ckpt_dir = local_or_remote(workdir) / CHECKPOINT_DIR
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()
                  and (p / "params").exists() and ocp.path.step.is_checkpoint_finalized(p))


def save_params(workdir, params, step: int = 0) -> None:
    """Writes a params-only checkpoint (e.g. from `convert`) and waits for it."""
    with make_manager(workdir, item_names=("params",)) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        mngr.wait_until_finished()


@contextlib.contextmanager
def _readable(directory):
    """Storage errors while reading a checkpoint (a file missing or cut short: a damaged disk,
    a partial copy) as one CheckpointError naming the step directory; running out of memory
    is one too, which does not call the checkpoint damaged."""
    previous = _quiet_closed_loop_callbacks()
    try:
        yield
    except Exception as e:  # tensorstore / orbax raise plain Exceptions too
        if isinstance(e, (UserError, TypeError, AttributeError, NameError, AssertionError)):
            sys.unraisablehook = previous
            raise
        # The hook stays: the failed read's callbacks keep coming after this.
        while e.__cause__ is not None:  # orbax wraps tensorstore's reason ("NOT_FOUND: ...")
            e = e.__cause__
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        cut = f"{first[:300]}{'...' if len(first) > 300 else ''}"
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in first:
            raise CheckpointError(
                f"Checkpoint {directory} cannot be read now: out of memory or of another "
                f"resource ({cut}); the checkpoint is not damaged, keep it") from None
        raise CheckpointError(
            f"Checkpoint {directory} cannot be read (incomplete or damaged): "
            f"{cut}; if it is damaged, remove that "
            "directory to use the checkpoint before it") from None
    sys.unraisablehook = previous


def _quiet_closed_loop_callbacks():
    """After a failed read, tensorstore still calls back into orbax's event loop, which is
    closed by then: each call prints an unraisable "Event loop is closed" traceback around the
    error line. Drops those (only those); returns the hook it replaced."""
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    return previous


def restore_params(workdir, step: int, abstract_params) -> Any:
    """Restores only the params item, placed per the shardings in `abstract_params`.

    Args:
      abstract_params: tree of jax.ShapeDtypeStruct (with .sharding) the checkpoint must match.
    """
    with _readable(local_or_remote(workdir) / CHECKPOINT_DIR / str(step)):
        check_params_match(workdir, step, abstract_params)
        with make_manager(workdir, item_names=("params",)) as mngr:
            restored = mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params)))
    return restored.params


def params_shapes(workdir, step: int) -> dict:
    """{'path/to/param': shape} as stored in a checkpoint, read from its metadata only."""
    path = local_or_remote(workdir) / CHECKPOINT_DIR / str(step) / "params"
    with _readable(path.parent):
        tree = ocp.StandardCheckpointHandler().metadata(path).tree
    return {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params_match(workdir, step: int, abstract_params) -> None:
    """Raises CheckpointError naming the first differences between checkpoint and model."""
    stored = params_shapes(workdir, step)
    wanted = {jax.tree_util.keystr(k): tuple(v.shape)
              for k, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    problems = [f"missing {k}" for k in sorted(set(wanted) - set(stored))]
    problems += [f"unexpected {k}" for k in sorted(set(stored) - set(wanted))]
    problems += [f"{k}: checkpoint {stored[k]} vs model {wanted[k]}"
                 for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]
    if problems and stored and all(k.rsplit("[", 1)[0] in wanted for k in stored):
        # leaves nested under the model's kernels: a LoRA run's adapters (t5x_lite/lora.py)
        raise CheckpointError(f"{workdir} is a LoRA run: its checkpoints hold only adapters; "
                              f"merge them into the base first with `python -m t5x_lite.lora "
                              f"--workdir={workdir} --output=DIR` and use DIR")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"Checkpoint {workdir}/{CHECKPOINT_DIR}/{step} does not match the "
                              f"model: {'; '.join(problems[:3])}{more}")


def abstract_with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


# --- Training checkpoints: params + optimizer state + data iterator + config. -------------------


def make_train_manager(workdir, *, keep: int | None = None, async_save: bool = True
                       ) -> ocp.CheckpointManager:
    """Manager for full training checkpoints; incomplete (killed) saves are never listed."""
    return make_manager(workdir, keep=keep or None, async_save=async_save, item_names=TRAIN_ITEMS)


def save_train_state(mngr: ocp.CheckpointManager, step: int, params, opt_state, *,
                     data_iterator=None, config=None, force: bool = False) -> bool:
    """Starts an (async) save of one training checkpoint; returns whether one was started.

    Device arrays are copied to host before this returns, so the caller may donate or update
    them right away. The grain iterator's state is taken now, at `step`.
    """
    items = {"params": ocp.args.StandardSave(params),
             "opt_state": ocp.args.StandardSave(opt_state)}
    if data_iterator is not None:
        import grain  # local: only training needs it
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        items["config"] = ocp.args.JsonSave(json.loads(json.dumps(d, default=_json_default)))
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def _tree_shapes(tree) -> dict[str, tuple | str]:
    """{'0/0/mu/decoder/...': shape, '0/1': 'empty'}; keys spelt alike for a live tree
    (namedtuple attributes) and orbax's metadata tree of it (dict keys). Empty states
    (optax's EmptyState, MaskedState of one; None in the metadata) count: orbax refuses a tree
    with more or fewer of them."""
    def empty(x):
        return x is None or (isinstance(x, (tuple, list, dict)) and not jax.tree.leaves(x))

    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return {"/".join(map(name, path)): "empty" if empty(leaf) else tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=empty)[0]}


def _check_opt_state_match(step_dir, abstract_opt_state) -> None:
    """Raises OptimizerStateMismatch when the stored optimizer state has other leaves or shapes
    than this run's optimizer makes (another optimizer; clipping or Adafactor weight decay on or
    off): orbax's own error for it reads like a damaged checkpoint."""
    if not (step_dir / "opt_state").exists():
        return  # a params-only checkpoint: the caller says what it lacks
    tree = ocp.StandardCheckpointHandler().metadata(step_dir / "opt_state").tree
    stored, wanted = _tree_shapes(tree), _tree_shapes(abstract_opt_state)
    if stored != wanted:
        raise OptimizerStateMismatch(f"Checkpoint {step_dir} holds optimizer state that does "
                                     "not fit this run's optimizer (other states or shapes)")


def read_checkpoint_config(workdir, step: int) -> dict | None:
    """The run config a training checkpoint was saved with, or None (params-only ones)."""
    path = local_or_remote(workdir) / CHECKPOINT_DIR / str(step) / "config" / "metadata"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def restore_train_state(mngr: ocp.CheckpointManager, step: int, abstract_params,
                        abstract_opt_state, *, data_iterator=None):
    """Restores params and optimizer state onto the shardings in the abstract trees (which may
    describe a different mesh than the one that saved them), and the iterator's position.

    Returns:
      (params, opt_state); `data_iterator` is restored in place.
    """
    with _readable(mngr.directory / str(step)):
        return _restore_train_state(mngr, step, abstract_params, abstract_opt_state,
                                    data_iterator)


def _restore_train_state(mngr, step, abstract_params, abstract_opt_state, data_iterator):
    check_params_match(mngr.directory.parent, step, abstract_params)
    _check_opt_state_match(mngr.directory / str(step), abstract_opt_state)
    items = {"params": ocp.args.StandardRestore(abstract_params),
             "opt_state": ocp.args.StandardRestore(abstract_opt_state)}
    if data_iterator is not None:
        import grain
        if not (mngr.directory / str(step) / "data").exists():
            raise CheckpointError(f"Checkpoint {mngr.directory}/{step} has no data iterator state "
                                  "(a params-only checkpoint? use train.init_from for those)")
        own_state = (mngr.directory / str(step) / "data" /
                     f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if own_state.exists():
            # Tried first, so another pipeline's state reads as what it is, not as damage.
            state = json.loads(own_state.read_text())
            try:
                data_iterator.set_state(state)
            except Exception as e:  # grain: KeyError / ValueError / TypeError / IndexError
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise DataStateMismatch(
                    f"the data iterator state in {mngr.directory}/{step} was written by another "
                    f"data pipeline ({type(e).__name__}: {first})") from None
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        else:
            # The iterator position is per process: with another process count there is no
            # state for this process. Params and optimizer state still restore exactly.
            logging.warning("Checkpoint %s/%s was written by a different number of processes: "
                            "its data iterator positions do not apply; data restarts from the "
                            "beginning of the seeded order.", mngr.directory, step)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return restored.params, restored.opt_state
