"""checkpoints: config I/O, path resolution, params-only and full training checkpoints (params,
optimizer state, grain iterator), restore onto other meshes, incomplete saves ignored."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from t5x_lite import checkpoints, partitioning
from t5x_lite.training import train_state


def _params():
    rng = np.random.default_rng(0)
    return {"dense": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)},
            "norm": {"scale": rng.normal(size=(8,)).astype(np.float32)}}


def _specs():
    return {"dense": {"kernel": P("fsdp", "tensor")}, "norm": {"scale": P("tensor")}}


def _placed(tree, mesh, specs):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def _abstract(tree, mesh, specs):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                          sharding=NamedSharding(mesh, s)),
                        tree, specs)


def test_config_roundtrip_and_overwrite(tmp_path):
    checkpoints.write_config(tmp_path, {"model": {"d_model": 8}, "mesh": {"rules": (("a", None),)}})
    checkpoints.write_config(tmp_path, {"model": {"d_model": 16}})  # a resumed run rewrites it
    assert checkpoints.read_config(tmp_path).model.d_model == 16
    with pytest.raises(checkpoints.CheckpointError, match="not a t5x_lite workdir"):
        checkpoints.read_config(tmp_path / "nope")


def test_params_checkpoint_resolve_and_mismatch(tmp_path):
    params = _params()
    checkpoints.save_params(tmp_path, params, step=7)
    assert checkpoints.all_steps(tmp_path) == [7]
    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "7"):
        assert checkpoints.resolve(path) == (tmp_path, 7)
    mesh = partitioning.make_mesh(1, 4, 2)
    got = checkpoints.restore_params(tmp_path, 7, _abstract(params, mesh, _specs()))
    np.testing.assert_array_equal(got["dense"]["kernel"], params["dense"]["kernel"])
    assert got["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
    wrong = {"dense": {"kernel": np.zeros((16, 4), np.float32)}, "norm": params["norm"]}
    with pytest.raises(checkpoints.CheckpointError, match=r"kernel'\]: checkpoint \(16, 8\) vs"):
        checkpoints.restore_params(tmp_path, 7, _abstract(wrong, mesh, _specs()))


def _iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4).to_iter_dataset())


@pytest.mark.parametrize("restore_mesh", [(1, 1, 1), (2, 2, 2)])
def test_train_checkpoint_restores_onto_another_mesh(tmp_path, restore_mesh):
    tx = optax.adamw(1e-2)
    mesh8 = partitioning.make_mesh(1, 4, 2)
    params = _placed(_params(), mesh8, _specs())
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = train_state.opt_state_shardings(abstract_opt, params, jax.tree.map(
        lambda x: x.sharding, params), mesh8)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
    it = _iterator()
    for _ in range(5):
        next(it)
    with checkpoints.make_train_manager(tmp_path, keep=2) as mngr:
        assert checkpoints.save_train_state(mngr, 5, params, opt_state, data_iterator=it,
                                            config={"seed": 1})
        want_next = next(it)  # the iterator moves on while the async save completes
        mngr.wait_until_finished()
    # Restore with fewer / differently arranged devices.
    n = int(np.prod(restore_mesh))
    mesh = partitioning.make_mesh(*restore_mesh, devices=jax.devices()[:n])
    abstract_p = _abstract(_params(), mesh, _specs())
    param_sh = jax.tree.map(lambda x: x.sharding, abstract_p)
    abs_opt = checkpoints.abstract_with_shardings(
        abstract_opt, train_state.opt_state_shardings(abstract_opt, abstract_p, param_sh, mesh))
    it2 = _iterator()
    with checkpoints.make_train_manager(tmp_path) as mngr:
        assert mngr.latest_step() == 5
        got_p, got_opt = checkpoints.restore_train_state(mngr, 5, abstract_p, abs_opt,
                                                         data_iterator=it2)
    np.testing.assert_array_equal(next(it2), want_next)
    for a, b in zip(jax.tree.leaves(got_p) + jax.tree.leaves(got_opt),
                    jax.tree.leaves(params) + jax.tree.leaves(opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert len(a.sharding.device_set) <= n
    assert got_opt[0].mu["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
    stored = (tmp_path / "checkpoints" / "5" / "config").glob("*")
    assert any(p.is_file() for p in stored)


def test_another_optimizer_state_is_a_clear_error_not_a_damaged_checkpoint(tmp_path):
    """Gradient clipping turned on at resume changes the optimizer state's tree: named as such,
    not as 'incomplete or damaged ... remove that directory' (orbax's structure error)."""
    params = _params()
    with checkpoints.make_train_manager(tmp_path, async_save=False) as mngr:
        checkpoints.save_train_state(mngr, 4, params, optax.adamw(1e-2).init(params))
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    abstract_p = _abstract(params, mesh, _specs())
    repl = NamedSharding(mesh, P())
    with checkpoints.make_train_manager(tmp_path, async_save=False) as mngr:
        checkpoints.save_train_state(mngr, 5, params, optax.adafactor(1e-2).init(params))
    for step, tx in ((4, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))),
                     (4, optax.adafactor(1e-2)),
                     # the same arrays, one more (empty) state in its chain
                     (5, optax.adafactor(1e-2, weight_decay_rate=0.1))):
        abs_opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                               jax.eval_shape(tx.init, params))
        with checkpoints.make_train_manager(tmp_path) as mngr:
            with pytest.raises(checkpoints.OptimizerStateMismatch,
                               match=rf"checkpoints/{step} holds optimizer state that does not "
                               "fit"):
                checkpoints.restore_train_state(mngr, step, abstract_p, abs_opt)
    abs_opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                           jax.eval_shape(optax.adafactor(1e-2).init, params))
    with checkpoints.make_train_manager(tmp_path) as mngr:  # the same optimizer restores
        checkpoints.restore_train_state(mngr, 5, abstract_p, abs_opt)


def test_incomplete_save_is_ignored(tmp_path):
    checkpoints.save_params(tmp_path, _params(), step=10)
    # What a kill -9 in the middle of a save leaves behind: orbax's temporary step directory.
    partial = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\0" * 10)
    assert checkpoints.all_steps(tmp_path) == [10]
    assert checkpoints.resolve(tmp_path) == (tmp_path, 10)
    with checkpoints.make_train_manager(tmp_path) as mngr:
        assert mngr.latest_step() == 10


def test_a_step_being_written_in_place_is_not_listed(tmp_path, monkeypatch):
    """On GCS orbax writes a step dir in place and adds commit_success.txt last (no temp dir
    to rename): until then evaluate / infer / load must not pick the half-written step."""
    from orbax.checkpoint._src.path import gcs_utils
    checkpoints.save_params(tmp_path, _params(), step=10)
    monkeypatch.setattr(gcs_utils, "is_gcs_path", lambda path: True)  # what gs:// paths get
    (tmp_path / "checkpoints" / "10" / "commit_success.txt").write_text("done")
    writing = tmp_path / "checkpoints" / "20" / "params"
    writing.mkdir(parents=True)
    assert checkpoints.all_steps(tmp_path) == [10]
    assert checkpoints.resolve(tmp_path) == (tmp_path, 10)
    (writing.parent / "commit_success.txt").write_text("done")
    assert checkpoints.all_steps(tmp_path) == [10, 20]


def test_params_only_checkpoint_has_no_iterator_state(tmp_path):
    checkpoints.save_params(tmp_path, _params(), step=3)
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    abstract_p = _abstract(_params(), mesh, _specs())
    with checkpoints.make_train_manager(tmp_path) as mngr:
        with pytest.raises(checkpoints.CheckpointError, match="init_from"):
            checkpoints.restore_train_state(mngr, 3, abstract_p, {}, data_iterator=_iterator())


# The failed read's late storage callbacks ("Event loop is closed") may reach pytest's own hook.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["data_files_removed", "data_file_truncated",
                                    "data_file_halved", "array_data_cut"])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, damage):
    """A finished checkpoint whose files were lost or cut short afterwards (a bad disk, a
    partial copy) names the step directory instead of a storage-library traceback."""
    import sys

    params, specs = _params(), _specs()
    if damage == "array_data_cut":  # an array big enough for a data file of its own
        params["big"] = np.random.default_rng(1).normal(size=(256, 256)).astype(np.float32)
        specs["big"] = P()
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    abstract = _abstract(params, mesh, specs)
    checkpoints.save_params(tmp_path, params, step=5)
    hook = sys.unraisablehook
    checkpoints.restore_params(tmp_path, 5, abstract)
    assert sys.unraisablehook is hook  # a good read leaves the process as it was
    data = [p for p in (tmp_path / "checkpoints" / "5" / "params" / "d").iterdir()]
    if damage == "array_data_cut":  # metadata stays readable; the array's bytes do not
        data = [max((p for p in (tmp_path / "checkpoints" / "5" / "params").rglob("*")
                     if p.is_file()), key=lambda p: p.stat().st_size)]
    assert data
    for p in data:
        if damage == "data_files_removed":
            p.unlink()
        elif damage == "data_file_truncated":
            p.write_bytes(p.read_bytes()[:8])
        elif damage == "array_data_cut":
            p.write_bytes(p.read_bytes()[:100])
        else:  # cut in the middle
            p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    # The storage layer's own reason (a status code and the file), not orbax's wrapper line
    # ("Encountered error while reading array index ... <bound method pybind11...").
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"checkpoints/5 cannot be read \(incomplete or damaged\): "
                             r"[A-Z_]+: .*; if it is damaged, remove that directory") as e:
        checkpoints.restore_params(tmp_path, 5, abstract)
    assert "\n" not in str(e.value) and "pybind" not in str(e.value)
    with checkpoints.make_train_manager(tmp_path) as mngr:
        with pytest.raises(checkpoints.CheckpointError, match="cannot be read"):
            checkpoints.restore_train_state(mngr, 5, abstract, {})


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes.")])
def test_running_out_of_memory_while_reading_is_not_called_damage(tmp_path, monkeypatch, error):
    """Not 'incomplete or damaged ... remove that directory': the checkpoint is fine."""
    params = _params()
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    checkpoints.save_params(tmp_path, params, step=5)

    def restore(*args, **kwargs):
        raise error
    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "restore", restore)
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/5 cannot be read now: out "
                       r"of memory or of another resource \(.*\); the checkpoint is not damaged, "
                       r"keep it$"):
        checkpoints.restore_params(tmp_path, 5, _abstract(params, mesh, _specs()))


def test_relative_paths_work(tmp_path, monkeypatch):
    """orbax wants absolute paths (and says so only at the first save, after the training):
    every checkpoint function takes relative ones."""
    monkeypatch.chdir(tmp_path)
    params = _params()
    checkpoints.save_params("rel", params, step=2)
    assert (tmp_path / "rel" / "checkpoints" / "2" / "params").is_dir()
    workdir, step = checkpoints.resolve("rel")
    assert (workdir, step) == (tmp_path / "rel", 2)
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    restored = checkpoints.restore_params("rel", 2, _abstract(params, mesh, _specs()))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    with checkpoints.make_train_manager("rel2") as mngr:
        assert str(mngr.directory) == str(tmp_path / "rel2" / "checkpoints")


@pytest.mark.parametrize("text", ["[1, 2]", "{}", '{"model": 3}', "\udcff"])
def test_a_config_json_that_is_not_a_run_config_is_one_clear_error(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(checkpoints.CheckpointError, match="config.json is not (a t5x_lite run "
                       "config|valid JSON)") as e:
        checkpoints.read_config(tmp_path)
    assert "\n" not in str(e.value)
