"""Multi-host code paths, for real: several JAX processes on this machine (gloo over loopback).

`launch/cpu_local.sh` starts N processes of `python -m t5x_lite.train`; each gets 4 fake CPU
devices and joins one job through `t5x_lite.distributed.maybe_initialize()`. Checked here:
2 processes x 4 devices train to the losses of 1 process x 8 devices; each process reads a
disjoint shard and the global batch is their concatenation; only process 0 writes metrics,
events and config; both processes write their shards of a checkpoint, which restores exactly in
1 process, and a 1-process checkpoint restores in 2; a process killed with SIGKILL makes the
other exit with a clear error within the heartbeat timeout; a missed barrier times out; the
launcher stops everyone when one process fails. Every
subprocess has a hard timeout, so nothing here can hang CI.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, distributed
from t5x_lite.data import DataConfig
from t5x_lite.data import testing as data_testing
from t5x_lite.training import train
from t5x_lite.training.metrics_writer import METRICS_FILE, read_jsonl

REPO = pathlib.Path(__file__).resolve().parent.parent
CPU_LOCAL = str(REPO / "launch" / "cpu_local.sh")
STEPS = 4

# Config of the training runs: a tiny GPT on one-sentence documents, unpacked, so that a batch
# holds the same examples however many processes read it (the pipeline deals the globally
# shuffled stream round-robin to processes), and FSDP over all 8 devices, so that every process
# owns a real shard of each parameter.
CONFIG = """\
from t5x_lite.training import testing


def get_config():
    c = testing.tiny_config("gpt", vocab_size=512)
    c.data.source = "text"
    c.data.paths = ({text!r},)
    c.data.document_per = "line"
    c.data.data_dir = {data_dir!r}
    c.data.vocab_path = {vocab!r}
    c.data.extra_ids = 100
    c.data.pack = False
    c.mesh.data = 1
    c.mesh.fsdp = 8
    c.train.num_steps = {steps}
    c.train.log_every = 1
    c.train.eval_every = {steps}
    c.train.eval_batches = 0  # the whole validation split: the processes' shards differ in size
    c.checkpoint.save_every = {steps}
    return c
"""

# Runs under cpu_local.sh after the training runs: the data shards and the cross-restores.
PROBE = """\
import json, sys
import numpy as np
from t5x_lite import distributed
distributed.maybe_initialize()
import jax
from jax.experimental import multihost_utils
import cfg
from t5x_lite import partitioning
from t5x_lite.data import load_vocab, make_dataset, make_global_batch
from tests_multihost_restore import restore_flat

out = sys.argv[1]
c = cfg.get_config()
mesh = partitioning.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
it = make_dataset(c.data, load_vocab(c.data), split="train", seed=c.seed,
                  batch_size=c.train.batch_size // jax.process_count())
local, glob = [], []
for _ in range(3):
    batch = next(it)
    local += batch["decoder_target_tokens"].tolist()
    g = make_global_batch(batch, mesh)["decoder_target_tokens"]
    glob += multihost_utils.process_allgather(g, tiled=True).tolist()
result = {"local": local, "global": glob}
for name in sys.argv[2:]:
    result[name] = {k: v.tolist() for k, v in restore_flat(c, out + "/" + name, mesh).items()}

# Scores whose rows lie on both processes' devices (np.asarray of them raised).
import t5x_lite
from t5x_lite.evaluation import likelihood
loaded = t5x_lite.load(out + "/two")
rows = np.arange(3, 33, dtype=np.int32).reshape(3, 10)
result["score"] = loaded.score(rows[:, :6], rows[:, 6:]).tolist()
result["choice"] = likelihood.log_likelihoods(
    loaded, rows[:, :4].tolist(), rows[:, 4:].tolist(), batch_size=2).tolist()

# A step that only this process lists (a trainer saving between the processes' listings): the
# step every process picks is process 0's.
from t5x_lite import checkpoints
from t5x_lite.evaluation import runner
listed = checkpoints.all_steps
if jax.process_index() == 1:
    checkpoints.all_steps = lambda w: listed(w) + [listed(w)[-1] + 1]
result["resolved"] = checkpoints.resolve(out + "/two")[1]
result["selected"] = [runner._selection(checkpoints.local_or_remote(out + "/two"), s)[1]
                      for s in ("latest", "all")]
checkpoints.all_steps = listed
with open(f"{out}/probe_{jax.process_index()}.json", "w") as f:
    json.dump(result, f)
"""

RESTORE = """\
import jax
import numpy as np
from jax.experimental import multihost_utils
from t5x_lite import checkpoints, partitioning
from t5x_lite.config import ModelConfig
from t5x_lite.models import build_model
from t5x_lite.training import optimizers, train_state


def restore_flat(c, workdir, mesh):
    \"\"\"Params + optimizer state of the latest checkpoint, restored onto `mesh`, as host
    numpy arrays keyed by tree path (gathered from every process).\"\"\"
    rules = partitioning.rules_from_config(c.mesh.get("rules"))
    tx, _ = optimizers.make_optimizer(c.optimizer, c.train.num_steps)
    abstract, sh = train_state.state_shardings(build_model(ModelConfig.from_dict(c.model)), tx,
                                               mesh, rules)
    mngr = checkpoints.make_train_manager(workdir)
    params, opt = checkpoints.restore_train_state(
        mngr, mngr.latest_step(),
        checkpoints.abstract_with_shardings(abstract.params, sh.params),
        checkpoints.abstract_with_shardings(abstract.opt_state, sh.opt_state))
    mngr.close()
    tree = {"params": params, "opt_state": opt}
    host = multihost_utils.process_allgather(tree, tiled=True)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(host)[0]}
"""

# A process that runs collectives, for the launcher / barrier tests.
WORKER = """\
import os, sys, time
from t5x_lite import distributed
distributed.maybe_initialize()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mode, me = sys.argv[1], jax.process_index()
mesh = jax.make_mesh((jax.device_count(),), ("d",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")),
                                           np.ones(jax.local_device_count(), np.float32))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
print("sum", float(total(x)), flush=True)
if mode == "exit" and me == 1:
    os._exit(3)
if mode == "barrier":
    if me == 0:
        try:
            distributed.barrier("everyone", timeout_s=3)
        except distributed.DistributedError as e:
            print("caught:", e, flush=True)
            os._exit(7)
    time.sleep(120)
for i in range(600):  # ~60 s of collectives unless something stops us
    print("step", i, float(total(x)), flush=True)
    time.sleep(0.1)
"""


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("T5X_LITE_")}
    env.pop("XLA_FLAGS", None)  # cpu_local.sh sets the device count per process
    env.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), **extra)
    return env


def _cpu_local(tmp_path, args, *, timeout, log_dir=None, wait=True, **env):
    """Runs launch/cpu_local.sh (2 processes x 4 devices) with a hard time limit."""
    cmd = ["bash", CPU_LOCAL, "--num_processes=2", "--devices_per_process=4",
           "--heartbeat_timeout=10", f"--timeout={timeout}"]
    if log_dir:
        cmd.append(f"--log_dir={log_dir}")
    if not wait:
        return subprocess.Popen(cmd + args, cwd=REPO, env=_env(tmp_path, **env), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd + args, cwd=REPO, env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=timeout + 30)


def _direct_envs(tmp_path, heartbeat_s: int) -> list[dict]:
    """Environments of 2 processes x 4 devices started directly (no launcher): one job on a
    free local port."""
    port = subprocess.run([sys.executable, "-c", "import socket; s = socket.socket(); "
                           "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"],
                          capture_output=True, text=True).stdout.strip()
    return [_env(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                 T5X_LITE_COORDINATOR=f"127.0.0.1:{port}", T5X_LITE_NUM_PROCESSES="2",
                 T5X_LITE_PROCESS_ID=str(i), T5X_LITE_HEARTBEAT_TIMEOUT=str(heartbeat_s))
            for i in (0, 1)]


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in read_jsonl(pathlib.Path(workdir) / METRICS_FILE)
            if "loss" in r]


# --- maybe_initialize: decisions that need no second process. --------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("T5X_LITE_") or k in distributed._CLUSTER_ENV:
            monkeypatch.delenv(k)
    return monkeypatch


def test_single_process_unless_asked(clean_env):
    assert distributed.maybe_initialize() is False
    clean_env.setenv("T5X_LITE_NUM_PROCESSES", "1")
    clean_env.setenv("T5X_LITE_PROCESS_ID", "0")
    clean_env.setenv("T5X_LITE_COORDINATOR", "127.0.0.1:1")
    assert distributed.maybe_initialize() is False  # one process: nothing to join
    assert distributed.maybe_initialize(mode="off", num_processes=2, process_id=1) is False


def test_bad_settings_fail_with_one_clear_line(clean_env):
    with pytest.raises(distributed.DistributedError, match=r"missing \['coordinator_address'"):
        distributed.maybe_initialize(num_processes=2, process_id=0)
    with pytest.raises(distributed.DistributedError, match=r"process_id must be in \[0, 2\)"):
        distributed.maybe_initialize(coordinator_address="127.0.0.1:1", num_processes=2,
                                     process_id=2)
    clean_env.setenv("T5X_LITE_NUM_PROCESSES", "two")
    with pytest.raises(distributed.DistributedError, match="not a valid int"):
        distributed.maybe_initialize()
    clean_env.delenv("T5X_LITE_NUM_PROCESSES")
    with pytest.raises(distributed.DistributedError, match="mode must be one of"):
        distributed.maybe_initialize(mode="maybe")
    # Once this process has created its devices, joining a job cannot work any more.
    jax.devices()
    with pytest.raises(distributed.DistributedError, match="before any JAX computation"):
        distributed.maybe_initialize(coordinator_address="127.0.0.1:1", num_processes=2,
                                     process_id=0)


def test_unusable_settings_are_refused_before_jax_sees_them(clean_env):
    # jax.distributed.initialize fails on a port-less address with an IndexError traceback.
    for address in ("localhost", "127.0.0.1:99999", "127.0.0.1:0"):
        with pytest.raises(distributed.DistributedError, match=rf"must be host:port with a port "
                                                               rf"in 1-65535, got '{address}'"):
            distributed.maybe_initialize(coordinator_address=address, num_processes=2,
                                         process_id=0)
    with pytest.raises(distributed.DistributedError, match="num_processes must be >= 1, got 0"):
        distributed.maybe_initialize(coordinator_address="127.0.0.1:1", num_processes=0,
                                     process_id=0)
    clean_env.setenv("T5X_LITE_HEARTBEAT_TIMEOUT", "0")
    with pytest.raises(distributed.DistributedError, match="heartbeat_timeout must be >= 1"):
        distributed.maybe_initialize(coordinator_address="127.0.0.1:1", num_processes=2,
                                     process_id=0)


def _train_cli(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "t5x_lite.train", "--config=configs/tiny_t5.py",
                           f"--workdir={tmp_path / 'w'}", *args], cwd=REPO,
                          env=_env(tmp_path, **env), capture_output=True, text=True, timeout=120)


def test_distributed_on_without_a_cluster_is_one_line(tmp_path):
    """Mode `on` on a plain machine: JAX finds no cluster (a ValueError traceback before)."""
    r = _train_cli(tmp_path, "--distributed")
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        "train: error: jax.distributed.initialize() failed: coordinator_address should be "
        "defined"), r.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_nodistributed_flag_overrides_the_environment(tmp_path):
    """An explicit --nodistributed wins over T5X_LITE_DISTRIBUTED=on (it was ignored)."""
    code = ("import sys; from absl import flags; import t5x_lite.train; "
            "flags.FLAGS(sys.argv); from t5x_lite import distributed; "
            "print('initialized', distributed.maybe_initialize())")
    r = subprocess.run([sys.executable, "-c", code, "--nodistributed", "--workdir=w"], cwd=REPO,
                       env=_env(tmp_path, T5X_LITE_DISTRIBUTED="on"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "initialized False", r.stderr[-2000:]


def test_auto_mode_sees_cluster_environments(clean_env):
    assert not distributed._cluster_visible()
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0")  # a single-host TPU VM
    assert not distributed._cluster_visible()
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3")
    assert distributed._cluster_visible()
    clean_env.delenv("TPU_WORKER_HOSTNAMES")
    clean_env.setenv("SLURM_NTASKS", "4")
    assert distributed._cluster_visible()


# --- The launcher and barriers, with a small worker. ------------------------------------------


def test_cpu_local_stops_the_others_when_one_process_fails(tmp_path):
    (tmp_path / "mh_worker.py").write_text(WORKER)
    start = time.time()
    r = _cpu_local(tmp_path, ["--module=mh_worker", "--", "exit"], timeout=90)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "process 1 exited with status 3; stopping the other processes" in r.stderr
    assert "[0] sum 8.0" in r.stdout and "[1] sum 8.0" in r.stdout  # 2 x 4 devices, one job
    assert time.time() - start < 60


def test_barrier_times_out_with_a_clear_error(tmp_path):
    (tmp_path / "mh_worker.py").write_text(WORKER)
    r = _cpu_local(tmp_path, ["--module=mh_worker", "--", "barrier"], timeout=90)
    assert r.returncode != 0
    assert ("[0] caught: Barrier 'everyone' failed on process 0 after waiting up to 3s"
            in r.stdout), r.stdout[-3000:]


# --- Training: 2 processes x 4 devices vs 1 process x 8 devices. ------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    text = tmp / "corpus.txt"  # one-sentence documents, none longer than a row (no splitting)
    text.write_text("\n".join(data_testing.sentences(600, seed=3, min_words=2, max_words=4)))
    vocab = data_testing.tiny_vocab()  # built here once, read by every process
    (tmp / "cfg.py").write_text(CONFIG.format(text=str(text), data_dir=str(tmp / "data"),
                                              vocab=str(vocab.path), steps=STEPS))
    (tmp / "tests_multihost_restore.py").write_text(RESTORE)
    sys.path.insert(0, str(tmp))
    import cfg  # noqa: E402  (the file just written)
    sys.path.remove(str(tmp))
    from t5x_lite.data import sources
    sources.make_source(DataConfig.from_dict(cfg.get_config().data), "train")  # prepare once

    # 2 processes x 4 devices in the background while this process trains 1 x 8 devices.
    two = _cpu_local(tmp, ["--", f"--config={tmp / 'cfg.py'}", f"--workdir={tmp / 'two'}"],
                     timeout=300, log_dir=tmp / "logs", wait=False)
    one = train(cfg.get_config(), tmp / "one")
    assert one.step == STEPS
    out, err = two.communicate(timeout=330)
    logs = {i: (tmp / "logs" / f"process_{i}.log").read_text() for i in (0, 1)}
    assert two.returncode == 0, err[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    return tmp, cfg.get_config(), logs


def test_two_processes_train_to_the_losses_of_one(runs):
    tmp, _, logs = runs
    one, two = _losses(tmp / "one"), _losses(tmp / "two")
    assert [s for s, _ in two] == list(range(1, STEPS + 1))
    assert [s for s, _ in one] == [s for s, _ in two]
    # Same examples per batch, in another row order: equal up to float summation order.
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=2e-5)
    assert abs(two[0][1] - two[-1][1]) > 1e-2  # it did train
    # In-loop eval over the whole validation split, each process stepping until both are done.
    evals = [[r for r in read_jsonl(tmp / d / METRICS_FILE) if "eval/loss" in r]
             for d in ("one", "two")]
    assert [[r["step"] for r in e] for e in evals] == [[STEPS], [STEPS]]
    np.testing.assert_allclose(evals[1][0]["eval/loss"], evals[0][0]["eval/loss"], rtol=2e-5)
    np.testing.assert_allclose(evals[1][0]["eval/accuracy"], evals[0][0]["eval/accuracy"],
                               rtol=1e-6)
    assert "JAX distributed: process 1 of 2, 4 local / 8 global devices" in logs[1]


def test_only_process_0_writes_metrics_events_and_config(runs):
    tmp, _, logs = runs
    two = tmp / "two"
    assert len(read_jsonl(two / METRICS_FILE)) == len(read_jsonl(tmp / "one" / METRICS_FILE))
    assert len(list((two / "events").iterdir())) == 1
    assert (two / checkpoints.CONFIG_FILE).exists()
    for i in (0, 1):  # both processes log progress to their console
        assert f"step {STEPS}/{STEPS}" in logs[i]


def test_both_processes_write_their_checkpoint_shards(runs):
    tmp, _, _ = runs
    step_dir = tmp / "two" / "checkpoints" / str(STEPS)
    for i in (0, 1):
        shard = step_dir / "params" / f"ocdbt.process_{i}"
        assert shard.is_dir() and any(p.is_file() for p in shard.rglob("*")), shard
        assert (step_dir / "data" / f"process_{i}-of-2.json").exists()


def test_disjoint_data_shards_and_cross_process_restores(runs):
    tmp, config, _ = runs
    (tmp / "probe.py").write_text(PROBE)
    r = _cpu_local(tmp, ["--module=probe", "--", str(tmp), "one", "two"], timeout=240,
                   log_dir=tmp / "probe_logs")
    assert r.returncode == 0, (tmp / "probe_logs" / "process_0.log").read_text()[-3000:]
    probes = [json.loads((tmp / f"probe_{i}.json").read_text()) for i in (0, 1)]

    # Data: per process 3 batches of 4 rows; disjoint; the global batch is p0's rows then p1's.
    rows = [[tuple(r) for r in p["local"]] for p in probes]
    assert len(rows[0]) == len(rows[1]) == 12
    assert not set(rows[0]) & set(rows[1])
    glob = [tuple(r) for r in probes[0]["global"]]
    assert glob == [r for b in range(3) for p in (0, 1) for r in rows[p][4 * b:4 * b + 4]]
    from t5x_lite.data import load_vocab, make_dataset
    single = make_dataset(config.data, load_vocab(config.data), split="train", seed=config.seed,
                          batch_size=8, process_index=0, process_count=1)
    one_rows = [tuple(r) for _ in range(3) for r in next(single)["decoder_target_tokens"].tolist()]
    assert sorted(one_rows) == sorted(rows[0] + rows[1])  # together: exactly 1 process's data

    # Checkpoints: restored in 2 processes == restored in 1 (here), whoever wrote them.
    sys.path.insert(0, str(tmp))
    from tests_multihost_restore import restore_flat  # noqa: E402
    sys.path.remove(str(tmp))
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    here = {name: restore_flat(config, str(tmp / name), mesh) for name in ("one", "two")}
    for name in ("one", "two"):
        there = probes[0][name]
        assert set(there) == set(here[name])
        for k, v in here[name].items():
            np.testing.assert_array_equal(np.asarray(there[k], v.dtype), v, err_msg=f"{name} {k}")
    # Process 1 also listed step STEPS + 1; both took process 0's steps.
    for p in probes:
        assert p["resolved"] == STEPS and p["selected"] == [[STEPS], [STEPS]]
    # Scores of rows on both processes' devices: every process has all, equal to 1 process's.
    import t5x_lite
    from t5x_lite.evaluation import likelihood
    loaded = t5x_lite.load(tmp / "two")
    rows = np.arange(3, 33, dtype=np.int32).reshape(3, 10)
    want = {"score": loaded.score(rows[:, :6], rows[:, 6:]),
            "choice": likelihood.log_likelihoods(loaded, rows[:, :4].tolist(),
                                                 rows[:, 4:].tolist(), batch_size=2)}
    for p in probes:
        for k, v in want.items():
            np.testing.assert_allclose(p[k], v, rtol=1e-5, err_msg=k)

    # The 2-process run's state is (up to float order) the 1-process run's. Except key biases:
    # softmax ignores a per-query shift, so their true gradient is 0 and Adam blows the float
    # noise left in it up to +-lr steps, differently for every summation order.
    for k in here["one"]:
        if "key_bias" not in k:
            np.testing.assert_allclose(here["two"][k], here["one"][k], rtol=1e-5, atol=1e-6,
                                       err_msg=k)


def test_two_process_run_resumes_in_one_process(runs, caplog):
    """Params and optimizer state carry over; the per-process data positions cannot, which is
    logged, and training goes on from the checkpointed step."""
    tmp, config, _ = runs
    workdir = tmp / "two_resumed_in_one"
    shutil.copytree(tmp / "two", workdir)
    config.train.num_steps = STEPS + 2
    with caplog.at_level("WARNING"):
        result = train(config, workdir)
    assert result.step == STEPS + 2
    assert "different number of processes" in caplog.text
    steps = [s for s, _ in _losses(workdir)]
    assert steps == list(range(1, STEPS + 3))


def test_killed_process_makes_the_other_exit_with_a_clear_error(tmp_path):
    """SIGKILL one of two processes in the middle of their collectives. The processes are
    started directly (no launcher that could stop the survivor): JAX's coordination service
    must notice the missing heartbeats and end process 0 with a clear message."""
    (tmp_path / "mh_worker.py").write_text(WORKER)
    procs, logs = [], []
    for i, env in enumerate(_direct_envs(tmp_path, heartbeat_s=5)):
        env["PYTHONUNBUFFERED"] = "1"
        log = open(tmp_path / f"p{i}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "mh_worker", "loop"], cwd=REPO,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 60
        while "step 5" not in (tmp_path / "p0.log").read_text():
            assert procs[0].poll() is None and procs[1].poll() is None, \
                (tmp_path / "p0.log").read_text()[-3000:]
            assert time.time() < deadline, "the processes did not start within 60 s"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        code = procs[0].wait(timeout=60)  # heartbeat timeout 5 s (+ detection slack)
        took = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    out = (tmp_path / "p0.log").read_text()
    assert code != 0
    assert "another task died" in out and "stopped sending heartbeats" in out, out[-3000:]
    assert took < 30


# --- Errors in a 2-process train: one line on every process, exit status 1, no hang. ----------

BAD_RUN_CONFIG = """\
from t5x_lite.training import testing


def get_config():
    c = testing.tiny_config("gpt", vocab_size=512)
    c.data.source = "jsonl"
    c.data.paths = ({data!r},)
    c.data.data_dir = {data_dir!r}
    c.data.vocab_path = {vocab!r}
    c.data.extra_ids = 100
    c.train.num_steps = 2
    return c
"""


def _train_two_processes(tmp_path, *args) -> list[tuple[int, str]]:
    """`t5x_lite.train` of BAD_RUN_CONFIG (its data has a bad line) in 2 processes x 4 devices
    started directly; see `_direct_train`."""
    lines = [json.dumps({"text": f"record {i} of a few words"}) for i in range(200)]
    lines[150] = '{"text": "cut'  # found by the one process that prepares the data
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "cfg.py").write_text(BAD_RUN_CONFIG.format(
        data=str(tmp_path / "data.jsonl"), data_dir=str(tmp_path / "tfds"),
        vocab=str(data_testing.tiny_vocab().path)))
    run = [f"--config={tmp_path / 'cfg.py'}", f"--workdir={tmp_path / 'run'}", *args]
    return _direct_train(tmp_path, [run, run])


def _direct_train(tmp_path, args: list[list[str]]) -> list[tuple[int, str]]:
    """`t5x_lite.train` in 2 processes x 4 devices started directly (no launcher that stops the
    others when one fails, as on a pod), process i with flags `args[i]`; their (exit status,
    last stderr line)."""
    procs = []
    for env, flags in zip(_direct_envs(tmp_path, heartbeat_s=10), args):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "t5x_lite.train", *flags], cwd=tmp_path, env=env, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    ends = []
    try:
        for p in procs:  # each waited for alone: a process left hanging fails the test
            _, err = p.communicate(timeout=120)
            ends.append((p.returncode, err.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return ends


def test_data_that_process_0_cannot_prepare_stops_both_with_one_line(tmp_path):
    """Process 0 prepares local files for all; the other waited for it in a barrier that never
    learnt of its failure (both aborted after the heartbeat timeout, or hung with jax's
    defaults)."""
    (p0, last0), (p1, last1) = _train_two_processes(tmp_path)
    assert (p0, p1) == (1, 1), (last0, last1)
    assert last0 == (f"train: error: {tmp_path / 'data.jsonl'}:151: invalid JSON (Unterminated "
                     "string starting at at column 10)")
    assert last1.startswith("train: error: process 0 could not prepare ")
    assert last1.endswith("; its log says why")


def test_a_tensor_axis_across_processes_is_refused_on_both(tmp_path):
    """Mesh (1, 1, 8) over 2 processes: one batch shard on both processes' devices, each
    feeding rows of its own; it trained on half-matched batches without a word."""
    (p0, last0), (p1, last1) = _train_two_processes(tmp_path, "--config.mesh.fsdp=1",
                                                    "--config.mesh.tensor=8")
    assert (p0, p1) == (1, 1) and last0 == last1, (last0, last1)
    assert last0 == ("train: error: mesh (data, fsdp, tensor)=(1, 1, 8) puts each batch shard "
                     "on devices of several processes, but every process loads rows of its "
                     "own: make data*fsdp=1 a multiple of the 2 processes (so that tensor stays "
                     "within a process's devices)")
    assert not (tmp_path / "run").exists()


def test_workdirs_that_list_different_checkpoints_stop_both_with_one_line(runs, tmp_path):
    """A --workdir on each host's own disk: process 0 lists a checkpoint there, the other none.
    Process 0 resumed while the other started afresh, and their collectives never matched."""
    tmp, _, _ = runs
    shutil.copytree(tmp / "two", tmp_path / "host0")  # a checkpoint at STEPS
    (p0, last0), (p1, last1) = _direct_train(tmp_path, [
        [f"--config={tmp / 'cfg.py'}", f"--workdir={tmp_path / f'host{i}'}",
         f"--config.train.num_steps={STEPS + 2}"] for i in (0, 1)])
    assert (p0, p1) == (1, 1), (last0, last1)
    for i, last in enumerate((last0, last1)):  # each names its own (on a pod: the same path)
        assert last == (f"train: error: the processes see different checkpoints in "
                        f"{tmp_path / f'host{i}' / 'checkpoints'} (process 0: step {STEPS}, "
                        "process 1: none): --workdir must be one directory that every host "
                        "shares (a bucket or a shared file system)")
    assert sorted(checkpoints.all_steps(tmp_path / "host0")) == [STEPS]
