"""Checkpoint selection (latest / all / STEP / PATH), --follow beside a "training job" that
lands checkpoints over time, atomic outputs, the CLI, and one-line errors for bad input."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import pytest
from events_reader import tensorboard_view

from t5x_lite import checkpoints, lease
from t5x_lite.data import DataConfigError
from t5x_lite.data.builders import EmptyCorpusError
from t5x_lite.evaluation import EvalError, EvalSettings, outputs, run, testing
from t5x_lite.evaluation.few_shot import FewShotError, FewShotOptions
from t5x_lite.evaluation.predictions import PredictionError
from t5x_lite.evaluation.text_metrics import MetricsError
from t5x_lite.models import build_model


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    paths = testing.write_sort_task(d / "data", num_train=200, num_validation=24)
    config = testing.sort_task_config(paths, steps=3, data_dir=str(d / "tfds"))
    config.train.batch_size = 8
    # A pool of checkpoints (random params, different seeds) to place into workdirs.
    model = build_model(testing.tiny_t5())
    pool = d / "pool"
    for step in (1, 2, 3):
        params = nn.meta.unbox(model.init(jax.random.key(step))["params"])
        checkpoints.save_params(pool, params, step)
    return d, config, pool


def _workdir(task, name, steps=()):
    d, config, pool = task
    wd = d / name
    checkpoints.write_config(wd, config)
    shutil.copy(config.data.vocab_path, wd / checkpoints.VOCAB_FILE)
    for s in steps:
        _land(pool, wd, s)
    return wd


def _land(pool, wd, step):
    """Copies a checkpoint in and renames it into place, as orbax finalises a save."""
    (wd / "checkpoints").mkdir(parents=True, exist_ok=True)
    tmp = wd / "checkpoints" / f"{step}.orbax-checkpoint-tmp-1"
    shutil.copytree(pool / "checkpoints" / str(step), tmp)
    tmp.rename(wd / "checkpoints" / str(step))


FAST = dict(predict="false")


def _follow_beside(trainer, wd):
    """`evaluate --follow` on wd while `trainer` (a thread) lands its checkpoints."""
    job = threading.Thread(target=trainer)
    job.start()
    try:
        return run(None, wd, EvalSettings(follow=True, poll_interval=0.1, follow_timeout=60,
                                          **FAST))
    finally:
        job.join()


def test_few_shot_and_quantized_evaluations_are_named_apart_by_default():
    """Unnamed, they wrote WORKDIR/eval/<step> and replaced the plain evaluation's metrics."""
    assert EvalSettings().name == ""
    assert EvalSettings(few_shot=FewShotOptions(k=3)).name == "3shot"
    assert EvalSettings(quantize="int8").name == "int8"
    assert EvalSettings(few_shot=FewShotOptions(k=0, scoring="choice"),
                        quantize="int8").name == "0shot_choice_int8"
    assert EvalSettings(name="mine", few_shot=FewShotOptions(k=3)).name == "mine"


def test_latest_step_and_path(task):
    wd = _workdir(task, "select", steps=(1, 2))
    assert [r["step"] for r in run(None, wd, EvalSettings(**FAST))] == [2]
    assert [r["step"] for r in run(None, wd, EvalSettings(**FAST))] == [2]  # overwrites
    assert [r["step"] for r in run(None, wd, EvalSettings(checkpoint="1", **FAST))] == [1]
    other = _workdir(task, "other", steps=(3,))
    (r,) = run(None, wd, EvalSettings(checkpoint=str(other / "checkpoints" / "3"), **FAST))
    assert r["step"] == 3 and r["checkpoint"].startswith(str(other))
    # Another run's step 3 is not this workdir's: named apart, so it neither replaces nor marks
    # done this workdir's own step 3 (it did both).
    assert outputs.done_steps(wd / "eval" / "from_other") == [3]
    assert outputs.done_steps(wd / "eval") == [1, 2] and not (other / "eval").exists()
    # TensorBoard shows each step once, with its latest metrics.json values, though step 2 was
    # evaluated twice and step 1 after it.
    for first_start_counts in (False, True):
        view = tensorboard_view(wd / "eval" / "events", first_start_counts)
        assert [(s, v) for s, tag, v in view if tag == "eval/loss"] == [
            (s, pytest.approx(outputs.read_metrics(wd / "eval", s)["loss"])) for s in (1, 2)]
    # Explicit steps are re-evaluated (and overwrite atomically); `all` skips done ones.
    assert run(None, wd, EvalSettings(checkpoint="all", **FAST)) == []
    named = run(None, wd, EvalSettings(checkpoint="all", name="again", **FAST))
    assert [r["step"] for r in named] == [1, 2]
    assert outputs.done_steps(wd / "eval" / "again") == [1, 2]
    metrics = outputs.read_metrics(wd / "eval", 2)
    assert metrics["examples"] == 24 and metrics["split"] == "validation"
    assert not list(wd.rglob("*.tmp"))


def test_a_step_killed_between_its_two_writes_is_evaluated_again(task, monkeypatch):
    """metrics.json marks a step done. A kill between it and the step's TensorBoard points
    lost the points for good (a resumed `all` skipped the step); the points come first now,
    so the step is left to do and its restart replaces them."""
    wd = _workdir(task, "killed", steps=(1, 2))

    class Killed(BaseException):
        pass

    writes = []

    def dies_at_the_second_write_of_step_2(fn):
        def write(*args):
            writes.append(next(a for a in args if isinstance(a, int)))
            if writes.count(2) == 2:
                raise Killed
            return fn(*args)
        return write

    with monkeypatch.context() as patch:
        for owner, name in ((outputs, "write_step"), (outputs.EventsWriter, "write")):
            patch.setattr(owner, name, dies_at_the_second_write_of_step_2(getattr(owner, name)))
        with pytest.raises(Killed):
            run(None, wd, EvalSettings(checkpoint="all", **FAST))
    assert outputs.done_steps(wd / "eval") == [1]
    assert [r["step"] for r in run(None, wd, EvalSettings(checkpoint="all", **FAST))] == [2]
    for first_start_counts in (False, True):
        view = tensorboard_view(wd / "eval" / "events", first_start_counts)
        assert [(s, v) for s, tag, v in view if tag == "eval/loss"] == [
            (s, pytest.approx(outputs.read_metrics(wd / "eval", s)["loss"])) for s in (1, 2)]


def test_follow_evaluates_each_new_checkpoint_once(task):
    _, config, pool = task
    wd = _workdir(task, "follow", steps=(1,))

    def trainer():
        for step in (2, 3):
            time.sleep(1.0)
            _land(pool, wd, step)

    results = _follow_beside(trainer, wd)
    # Stopped by itself after the final step (train.num_steps = 3), not by the timeout.
    assert [r["step"] for r in results] == [1, 2, 3]
    assert outputs.done_steps(wd / "eval") == [1, 2, 3]
    t0 = time.time()
    assert run(None, wd, EvalSettings(follow=True, poll_interval=0.1, **FAST)) == []
    assert time.time() - t0 < 30
    events = b"".join(p.read_bytes() for p in (wd / "eval" / "events").iterdir())
    assert events.count(b"eval/loss") == 3


def test_follow_stops_after_idle_timeout(task):
    wd = _workdir(task, "idle", steps=(1,))
    t0 = time.time()
    results = run(None, wd, EvalSettings(follow=True, poll_interval=0.1, follow_timeout=1.0,
                                         **FAST))
    assert [r["step"] for r in results] == [1] and time.time() - t0 < 60


def test_follow_waits_while_a_training_run_holds_the_lease(task):
    """Checkpoints further apart than follow_timeout: while the workdir's lease is live (here
    another host's, renewed by a "trainer" thread) --follow keeps waiting; once the lease is
    gone, the idle timeout runs."""
    wd = _workdir(task, "leased", steps=(1,))
    record = {"host": "other-vm", "pid": 4242, "token": "t", "heartbeat": time.time()}
    (wd / lease.LEASE_FILE).write_text(json.dumps(record))
    assert lease.live(wd)

    gone = []

    def trainer():  # the lease outlives the evaluation of step 1 by 4 follow_timeouts
        deadline = time.time() + 120
        while not outputs.is_done(wd / "eval", 1) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        (wd / lease.LEASE_FILE).write_text(json.dumps({**record, "heartbeat": time.time()}))
        time.sleep(1.0)
        (wd / lease.LEASE_FILE).unlink()  # the run ended (or crashed) without its final step
        gone.append(time.time())

    job = threading.Thread(target=trainer)
    job.start()
    try:
        results = run(None, wd, EvalSettings(follow=True, poll_interval=0.1, follow_timeout=0.5,
                                             **FAST))
        stopped = time.time()
    finally:
        job.join()
    assert [r["step"] for r in results] == [1]
    assert gone and stopped >= gone[0]  # waited out the lease, then the idle timeout
    stale = {**record, "heartbeat": time.time() - lease.STALE_S - 1}
    (wd / lease.LEASE_FILE).write_text(json.dumps(stale))  # a run on a host that died
    assert not lease.live(wd)


def test_follow_skips_a_checkpoint_whose_deletion_is_under_way(task, monkeypatch):
    """`checkpoint.keep` deletes a step while it is read: orbax removes its files before its
    directory, so the read fails while the directory is still there. Skipped, not a stop."""
    from t5x_lite.evaluation import runner
    wd = _workdir(task, "deleting", steps=(1, 2, 3))
    evaluate = runner.Evaluator.evaluate

    def deleted_while_read(self, ckpt_workdir, step):
        if step == 1:
            threading.Timer(1.0, shutil.rmtree, (wd / "checkpoints" / "1",)).start()
            raise checkpoints.CheckpointError("Checkpoint 1 cannot be read (incomplete or "
                                              "damaged): NOT_FOUND: _METADATA")
        return evaluate(self, ckpt_workdir, step)

    monkeypatch.setattr(runner.Evaluator, "evaluate", deleted_while_read)
    results = run(None, wd, EvalSettings(follow=True, poll_interval=0.1, follow_timeout=60,
                                         **FAST))
    assert [r["step"] for r in results] == [2, 3]


def test_follow_goes_past_the_final_step_while_the_run_is_live(task):
    """A trainer resumed with a higher train.num_steps rewrites config.json only once its
    state is built: --follow, which read the old final step (already evaluated), stopped."""
    d, config, pool = task
    wd = d / "extended"
    old = config.copy_and_resolve_references()
    old.train.num_steps = 2
    checkpoints.write_config(wd, old)
    shutil.copy(config.data.vocab_path, wd / checkpoints.VOCAB_FILE)
    for step in (1, 2):
        _land(pool, wd, step)
    run(None, wd, EvalSettings(checkpoint="all", **FAST))
    record = {"host": "other-vm", "pid": 4242, "token": "t", "heartbeat": time.time()}
    (wd / lease.LEASE_FILE).write_text(json.dumps(record))

    def trainer():
        time.sleep(1.0)
        _land(pool, wd, 3)
        time.sleep(1.0)
        (wd / lease.LEASE_FILE).unlink()

    assert [r["step"] for r in _follow_beside(trainer, wd)] == [3]


def test_follow_waits_for_the_trainer_to_write_its_config(task):
    """`train ... &` then `evaluate --follow` at once: the trainer makes checkpoints/ before
    it writes config.json (once its train state is built)."""
    d, config, pool = task
    wd = d / "late_config"
    (wd / "checkpoints").mkdir(parents=True)

    def trainer():
        time.sleep(1.0)
        shutil.copy(config.data.vocab_path, wd / checkpoints.VOCAB_FILE)
        checkpoints.write_config(wd, config)
        for step in (1, 3):
            _land(pool, wd, step)

    assert [r["step"] for r in _follow_beside(trainer, wd)] == [1, 3]
    never = d / "never_config"
    never.mkdir()
    t0 = time.time()
    with pytest.raises(checkpoints.CheckpointError, match="No config.json in"):
        run(None, never, EvalSettings(follow=True, poll_interval=0.1, follow_timeout=0.5))
    assert time.time() - t0 < 30


def test_few_shot_queries_and_pool_one_file_spelled_two_ways(task, monkeypatch):
    """No query is its own shot however the file is named; the decode length defaults to the
    plain evaluation's (T5: data.targets_length); metrics name the queries file as the split."""
    import json
    from t5x_lite.decoding import generate as gen
    d, config, pool = task
    wd = _workdir(task, "few_shot_paths", steps=(1,))
    q = d / "fs" / "q.jsonl"
    q.parent.mkdir()
    q.write_text("".join(json.dumps({"inputs": f"b a {w}", "targets": f"{w} a b"}) + "\n"
                         for w in ("c", "d", "e", "f")))
    seen = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda loaded, **kw: seen.append(
        kw["max_new_tokens"]) or real(loaded, **kw))
    (metrics, ) = run(None, wd, EvalSettings(
        few_shot=FewShotOptions(k=3, max_new_tokens=0), few_shot_queries=str(q),
        few_shot_pool=f"{d}/fs/../fs/q.jsonl"))
    # Named by default (3shot), apart from the plain evaluation: it wrote eval/1/metrics.json,
    # which marked step 1 as evaluated for a plain --checkpoint=all.
    assert not outputs.is_done(wd / "eval", 1)
    records = outputs.read_predictions(wd / "eval" / "3shot", 1)
    assert [sorted(r["shots"]) for r in records] == [
        [i for i in range(4) if i != r["index"]] for r in records]
    assert seen and set(seen) == {config.data.targets_length}
    assert metrics["split"] == str(q)


def test_few_shot_pool_from_the_eval_split_itself_never_shows_a_query_its_own_answer(task):
    """data.eval_split == data.train_split: the pool is the query split (and its duplicates)."""
    d, config, pool = task
    wd = _workdir(task, "few_shot_same_split", steps=(1,))
    rows = ["b a\ta b", "c a\ta c", "d a\ta d", "c  a\ta c", "e a\ta e"]  # row 3 = row 1
    (d / "data" / "small.tsv").write_text("".join(r + "\n" for r in rows))
    cfg = config.copy_and_resolve_references()
    cfg.data.train_paths = cfg.data.validation_paths = (str(d / "data" / "small.tsv"),)
    cfg.data.eval_split = cfg.data.train_split
    run(cfg, wd, EvalSettings(few_shot=FewShotOptions(k=3, max_new_tokens=1, seed=3)))
    records = outputs.read_predictions(wd / "eval" / "3shot", 1)
    twins = {1: {1, 3}, 3: {1, 3}}
    for r in records:
        i = r["index"]
        assert len(set(r["shots"])) == 3 and not set(r["shots"]) & twins.get(i, {i}), r


def test_eos_id_comes_from_the_run_config_the_params_come_from(task):
    """A LoRA run's step 0 is its base's weights: a --config LoRA run evaluated in a workdir
    without a config.json stops at its converted base's EOS (hf_config.json), as `load` does."""
    from t5x_lite import convert, lora
    from t5x_lite.evaluation.runner import Evaluator
    d, config, pool = task
    base = _workdir(task, "eos_base")
    shutil.copytree(pool / "checkpoints" / "1", base / "checkpoints" / "0")
    (base / convert.HF_SOURCE_CONFIG).write_text('{"eos_token_id": 9}')
    cfg = config.copy_and_resolve_references()
    cfg.lora = {"base": str(base), "base_step": 0, "targets": "query", "rank": 2}
    boxed = jax.eval_shape(lambda: build_model(testing.tiny_t5()).init(jax.random.key(0)))
    adapters = lora.init_adapters(jax.random.key(1), boxed["params"],
                                  lora.LoraConfig.from_dict(cfg.lora))
    adapters_dir = d / "eos_lora"  # checkpoints only: the run config is --config
    checkpoints.save_params(adapters_dir, nn.meta.unbox(adapters), 0)
    loaded = Evaluator(cfg, EvalSettings(**FAST)).load(adapters_dir, 0)
    assert loaded.eos_id == 9


def test_bad_settings_and_incomplete_run_configs_are_one_line(task):
    for kw, message in [(dict(poll_interval=-1), r"poll_interval must be in \(0, 86400\]"),
                        (dict(poll_interval=float("inf")),
                         r"poll_interval must be in \(0, 86400\] seconds"),
                        (dict(poll_interval=9223372035.0), r"in \(0, 86400\] seconds"),
                        (dict(follow_timeout=-5), "follow_timeout >= 0"),
                        (dict(name="events"), "must not be 'events'"),
                        (dict(batch_size=-8), "batch_size and max_new_tokens must be >= 0"),
                        (dict(max_new_tokens=-1), "batch_size and max_new_tokens must be >= 0")]:
        with pytest.raises(EvalError, match=message):
            EvalSettings(**kw)
    d, config, pool = task
    wd = _workdir(task, "sections", steps=(1,))
    checkpoints.write_config(wd, {"model": config.model.to_dict(),
                                  "data": config.data.to_dict()})
    with pytest.raises(EvalError, match=r"config.json or --config\) has no train, mesh section"):
        run(None, wd, EvalSettings(**FAST))
    checkpoints.write_config(wd, {**config.to_dict(), "model": {**config.model.to_dict(),
                                                                 "d_model": "64"}})
    with pytest.raises(ValueError, match="d_model must be int, got '64'"):
        run(None, wd, EvalSettings(**FAST))
    assert _nothing_written(wd)


def _nothing_written(wd):
    return not (wd / "eval").exists() or not any((wd / "eval").iterdir())


def test_bad_inputs_give_one_line_and_write_nothing(task):
    d, config, pool = task
    empty = _workdir(task, "empty")
    with pytest.raises(EvalError, match="No checkpoint in .*empty/checkpoints") as e:
        run(None, empty, EvalSettings())
    assert "\n" not in str(e.value) and _nothing_written(empty)

    wd = _workdir(task, "bad", steps=(1,))
    with pytest.raises(EvalError, match=r"No checkpoint for step 7 .* available: \[1\]"):
        run(None, wd, EvalSettings(checkpoint="7"))
    with pytest.raises(EvalError, match="does not exist"):
        run(None, wd, EvalSettings(checkpoint=str(d / "nowhere")))
    other_shape = config.copy_and_resolve_references()
    other_shape.model.d_model = 32
    with pytest.raises(checkpoints.CheckpointError, match="does not match the model"):
        run(other_shape, wd, EvalSettings(**FAST))
    missing_split = config.copy_and_resolve_references()
    missing_split.data.validation_paths = ()  # train files only: no validation split
    with pytest.raises(DataConfigError, match="no split 'validation'"):
        run(missing_split, wd, EvalSettings(**FAST))
    (d / "empty.jsonl").write_text("")
    with pytest.raises(FewShotError, match="empty.jsonl has no records"):
        run(None, wd, EvalSettings(few_shot=FewShotOptions(k=0), few_shot_queries=str(
            d / "empty.jsonl")))
    (d / "data" / "empty.tsv").write_text("")
    no_examples = config.copy_and_resolve_references()
    no_examples.data.validation_paths = (str(d / "data" / "empty.tsv"),)
    with pytest.raises(EmptyCorpusError, match="no documents in 1 validation file"):
        run(no_examples, wd, EvalSettings())
    with pytest.raises(EvalError, match="--follow .* not '1'"):
        run(None, wd, EvalSettings(checkpoint="1", follow=True))
    with pytest.raises(MetricsError, match="unknown metric 'meteor'"):  # also when not predicting
        run(None, wd, EvalSettings(predict="false", metrics="bleu,meteor"))
    # A pretraining config's splits hold text documents: few-shot needs query / pool files.
    (d / "data" / "docs.txt").write_text("some text\n\nmore text\n")
    docs = config.copy_and_resolve_references()
    docs.data.source, docs.data.objective = "text", "span_corruption"
    docs.data.extra_ids = 100  # sentinels, or the config itself is refused
    docs.data.train_paths = docs.data.validation_paths = (str(d / "data" / "docs.txt"),)
    with pytest.raises(PredictionError, match=r"text documents.*\(give --few_shot_queries="):
        run(docs, wd, EvalSettings(few_shot=FewShotOptions(k=0)))
    (d / "q.jsonl").write_text('{"inputs": "a b", "targets": "b a"}\n')
    with pytest.raises(PredictionError, match=r"\(give --few_shot_pool=FILE.jsonl, or "
                       r"--few_shot_k=0\)"):
        run(docs, wd, EvalSettings(few_shot=FewShotOptions(k=2),
                                   few_shot_queries=str(d / "q.jsonl")))
    assert _nothing_written(wd)


def test_outputs_are_atomic(tmp_path):
    outputs.write_step(tmp_path, 5, {"step": 5, "loss": 2.0}, [{"prediction": "b"}])
    outputs.write_step(tmp_path, 5, {"step": 5, "loss": 1.0}, [{"prediction": "a"}])  # redo
    assert outputs.read_predictions(tmp_path, 5) == [{"prediction": "a"}]
    with pytest.raises(TypeError):
        outputs.write_step(tmp_path, 5, {"step": 5, "bad": object()}, None)
    # The failed rewrite (a value JSON cannot hold) touched nothing: the previous metrics and
    # predictions are intact, and no temp files.
    assert outputs.read_metrics(tmp_path, 5) == {"step": 5, "loss": 1.0}
    assert outputs.read_predictions(tmp_path, 5) == [{"prediction": "a"}]
    assert sorted(p.name for p in (tmp_path / "5").iterdir()) == [
        "metrics.json", "predictions.jsonl"]
    outputs.write_step(tmp_path, 6, {"step": 6, "perplexity": float("inf")}, [])
    assert outputs.read_metrics(tmp_path, 6)["perplexity"] is None
    assert outputs.done_steps(tmp_path) == [5, 6]
    # Raw line separators inside strings (written with ensure_ascii=False) are text
    odd = [{"inputs": "x\u2028y\u0085z\x0cw", "prediction": "a\u2029b"}]
    outputs.write_step(tmp_path, 7, {"step": 7}, odd)
    assert "\u2028" in (tmp_path / "7" / outputs.PREDICTIONS_FILE).read_text()
    assert outputs.read_predictions(tmp_path, 7) == odd


def test_rewrite_killed_before_its_metrics_leaves_the_step_to_redo(tmp_path, monkeypatch):
    """--overwrite re-evaluation dying after the new predictions but before the new metrics:
    the step must not count as done (old metrics beside new predictions would)."""
    from t5x_lite import files
    outputs.write_step(tmp_path, 5, {"step": 5, "loss": 2.0}, [{"prediction": "old"}])
    real = files.write_atomic

    def killed_at_metrics(path, data):
        if str(path).endswith(outputs.METRICS_FILE):
            raise OSError("killed")
        real(path, data)

    monkeypatch.setattr(files, "write_atomic", killed_at_metrics)
    with pytest.raises(OSError, match="killed"):
        outputs.write_step(tmp_path, 5, {"step": 5, "loss": 1.0}, [{"prediction": "new"}])
    assert not outputs.is_done(tmp_path, 5) and outputs.done_steps(tmp_path) == []
    monkeypatch.setattr(files, "write_atomic", real)
    outputs.write_step(tmp_path, 5, {"step": 5, "loss": 1.0}, [{"prediction": "new"}])
    assert outputs.read_metrics(tmp_path, 5)["loss"] == 1.0
    assert outputs.read_predictions(tmp_path, 5) == [{"prediction": "new"}]


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "t5x_lite.evaluate", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli(task):
    wd = _workdir(task, "cli", steps=(2,))
    out = _cli(f"--workdir={wd}", "--checkpoint=latest", "--batch_size=8", "--predict=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "evaluate: step 2: loss=" in out.stdout and "perplexity=" in out.stdout
    assert outputs.read_metrics(wd / "eval", 2)["examples"] == 24
    # --follow once the final step (train.num_steps=3) is evaluated: says so, blames no timeout.
    _land(task[2], wd, 3)
    run(None, wd, EvalSettings(checkpoint="3", predict="false", batch_size=8))
    done = _cli(f"--workdir={wd}", "--follow", "--batch_size=8", "--predict=false")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ("evaluate: nothing to do (the final step 3 (train.num_steps) "
                                   "is already evaluated; --overwrite redoes it)")
    # A run trained on more devices than this machine has: --mesh evaluates it here.
    big = _workdir(task, "cli_big_mesh", steps=(2,))
    config = checkpoints.read_config(big)
    config.mesh.data, config.mesh.fsdp = 1, 16
    checkpoints.write_config(big, config)
    args = (f"--workdir={big}", "--batch_size=8", "--predict=false")
    refused = _cli(*args)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].endswith(
        "needs 16 devices but 1 are available (the run config's mesh.*; evaluate "
        "--mesh=data,fsdp,tensor sets another)")
    here = _cli(*args, "--mesh=1,1,1")
    assert here.returncode == 0, here.stderr[-2000:]
    assert outputs.read_metrics(big / "eval", 2)["loss"] == pytest.approx(
        outputs.read_metrics(wd / "eval", 2)["loss"], rel=1e-6)
    bad = _cli(f"--workdir={task[0] / 'nothing_here'}")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("evaluate: error: No config.json in")


def test_two_processes_give_the_single_process_metrics(task):
    """2 processes x 4 devices, packed eval batches (their counts may differ per process):
    the same exact sums as 1 process; the decoded predictions, whose rows are split over both
    processes' devices, equal the single process's."""
    _, config, _ = task
    packed = config.copy_and_resolve_references()
    packed.data.pack = True
    wd = _workdir(task, "multi", steps=(2,))
    checkpoints.write_config(wd, packed)
    (want,) = run(None, wd, EvalSettings(predict="true", name="single", max_new_tokens=6))
    script = os.path.join(os.path.dirname(__file__), "..", "launch", "cpu_local.sh")
    out = subprocess.run(
        ["bash", script, "--num_processes=2", "--devices_per_process=4",
         "--module=t5x_lite.evaluate", "--timeout=240", "--", f"--workdir={wd}",
         "--predict=true", "--max_new_tokens=6"], capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = outputs.read_metrics(wd / "eval", 2)
    for k in ("tokens", "examples", "num_predictions"):
        assert got[k] == want[k]
    for k in ("loss", "perplexity", "token_accuracy"):
        assert got[k] == pytest.approx(want[k], rel=1e-6)
    single = outputs.read_predictions(wd / "eval" / "single", 2)
    multi = outputs.read_predictions(wd / "eval", 2)
    assert len(multi) == 24 and [r["prediction"] for r in multi] == \
        [r["prediction"] for r in single]
    assert out.stdout.count("evaluate: step 2: loss=") == 2  # both processes finished


def test_predict_auto_decodes_prefix_lm_pairs_but_not_text(task, tmp_path):
    """A GPT trained with prefix_lm on inputs/targets pairs has answers to decode and score
    (auto left it out); on text documents it has none."""
    from t5x_lite.evaluation import testing as eval_testing
    from t5x_lite.evaluation.runner import Evaluator
    paths = eval_testing.write_sort_task(tmp_path / "data", num_train=20, num_validation=4)
    config = eval_testing.sort_task_config(paths, family="gpt", steps=1,
                                           data_dir=str(tmp_path / "tfds"))
    config.data.objective = "prefix_lm"
    assert Evaluator(config, EvalSettings()).wants_predictions()
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"document number {i} of the set" for i in range(40)))
    config.data.source, config.data.paths = "text", (str(text),)
    config.data.document_per = "paragraph"
    config.data.train_paths, config.data.validation_paths = (), ()
    assert not Evaluator(config, EvalSettings()).wants_predictions()
    assert Evaluator(config, EvalSettings(predict="true")).wants_predictions()


def test_rows_longer_than_a_learned_position_table_are_refused():
    # Positions past the table read NaN embeddings: every loss would be NaN, silently.
    from t5x_lite.evaluation.runner import Evaluator
    from t5x_lite.training import testing as training_testing
    config = training_testing.tiny_config("gpt")  # learned positions, max_len 32
    config.data.seq_len = 33
    with pytest.raises(EvalError, match=r"^data.seq_len=33 is longer than model.max_len=32, "
                       r"the model's learned position table; evaluate with data.seq_len <= 32$"):
        Evaluator(config, EvalSettings())


def test_few_shot_on_a_bert_says_so_before_reading_data():
    """It read the queries first and suggested --few_shot_queries=FILE.jsonl, which only led to
    the family error."""
    import importlib.util
    import pathlib

    from t5x_lite.evaluation import runner
    path = pathlib.Path(__file__).parent.parent / "configs" / "tiny_bert.py"
    spec = importlib.util.spec_from_file_location("tiny_bert", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(EvalError, match=r"^few-shot evaluation needs a t5 or gpt model; this "
                                        r"one is 'bert'"):
        runner.Evaluator(module.get_config(), EvalSettings(few_shot=FewShotOptions(k=0)))
