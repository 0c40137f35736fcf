"""The training loop end to end on the default corpus (8 fake CPU devices): learning, exact
resume after kill -9, SIGTERM, divergence, config mismatch, resume on another mesh."""
import math
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from t5x_lite import checkpoints
from t5x_lite.partitioning import MeshError
from t5x_lite.training import TrainingError, testing, train
from t5x_lite.training.metrics_writer import METRICS_FILE, read_jsonl
from t5x_lite.training import trainer as trainer_lib
from t5x_lite.training import train_step as train_step_lib
from t5x_lite.training.run_checks import (DivergenceError, PreemptionFlag, check_finite,
                                          check_workdir_config)
from t5x_lite.vocab import Vocabulary, train_vocab

REPO = pathlib.Path(__file__).resolve().parent.parent


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in read_jsonl(pathlib.Path(workdir) / METRICS_FILE)
            if "loss" in r]


def _config_file(tmp_path, family="gpt"):
    path = tmp_path / f"tiny_{family}_test_config.py"
    path.write_text("from t5x_lite.training import testing\n\n\n"
                    f"def get_config():\n    return testing.tiny_config({family!r})\n")
    return path


def test_kill9_then_resume_equals_uninterrupted_run(tmp_path):
    cfg = testing.tiny_config("gpt")
    cfg.train.num_steps = 30
    ref = train(cfg, tmp_path / "ref")
    assert ref.step == 30
    # Same run as a subprocess (the real entry point), killed once its first checkpoint landed.
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")  # + conftest's cache
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "t5x_lite.train", f"--config={_config_file(tmp_path)}",
         f"--workdir={workdir}", "--config.train.num_steps=30"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "10").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    # The same command started again while it runs: refused, nothing touched.
    with pytest.raises(TrainingError, match=rf"in use by another training run "
                                            rf"\(pid {proc.pid}: .*t5x_lite.train"):
        train(cfg, workdir)
    proc.kill()  # SIGKILL: no handler, no cleanup (and no stale lock: the resume below runs)
    proc.wait()
    killed_at = checkpoints.all_steps(workdir)[-1]
    assert killed_at < 30, "the run finished before it could be killed"
    resumed = train(cfg, workdir)
    assert resumed.step == 30
    assert _losses(workdir) == _losses(tmp_path / "ref")  # exactly: same batches, same math
    assert len(_losses(workdir)) == 15


def test_resume_edge_cases_log_like_one_run_and_say_what_they_refuse(tmp_path, monkeypatch,
                                                                     caplog):
    """A checkpoint between log steps, an eval between log steps, a finished workdir re-run, and
    an optimizer changed at resume."""
    # A fake clock: every step takes 100 s, every eval 1000 s (real time adds little).
    offset = [0.0]
    monkeypatch.setattr(trainer_lib, "time", type("Clock", (), {
        "time": staticmethod(lambda: time.time() + offset[0])}))

    def advancing(fn, seconds):
        def call(*args, **kwargs):
            offset[0] += seconds
            return fn(*args, **kwargs)
        return call
    real_jit = train_step_lib.jit_train_step
    monkeypatch.setattr(train_step_lib, "jit_train_step",
                        lambda *a, **k: advancing(real_jit(*a, **k), 100.0))
    monkeypatch.setattr(trainer_lib, "evaluate", advancing(trainer_lib.evaluate, 1000.0))

    cfg = testing.tiny_config("gpt")
    cfg.train.num_steps, cfg.train.log_every, cfg.checkpoint.save_every = 6, 4, 3
    cfg.train.eval_every, cfg.train.eval_batches = 5, 1
    train(cfg, tmp_path / "ref")
    ref = read_jsonl(tmp_path / "ref" / METRICS_FILE)
    # Eval at step 5 (not a log step) takes no training time, nor hides step 5's.
    times = [r["step_time"] for r in ref if "step_time" in r]
    assert len(times) == 3 and all(100 <= t < 110 for t in times), times

    # Stopped at checkpoint 3 (between log steps 0 and 4), then resumed: the same log windows.
    cfg.train.num_steps, cfg.train.eval_every = 3, 0
    train(cfg, tmp_path / "run")
    cfg.train.num_steps = 6
    assert train(cfg, tmp_path / "run").step == 6
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    assert [r["step"] for r in ref if "loss" in r] == [3, 4, 6]

    events = set((tmp_path / "run" / "events").iterdir())
    saved = (tmp_path / "run" / checkpoints.CONFIG_FILE).read_text()
    with caplog.at_level("WARNING"):
        assert train(cfg, tmp_path / "run").step == 6  # finished: says so, writes nothing
        cfg.train.num_steps = 4  # nor does a re-run asking for fewer steps than are done
        assert train(cfg, tmp_path / "run").step == 6
    assert "already at step 6 (train.num_steps=6): nothing to train" in caplog.text
    assert "already at step 6 (train.num_steps=4): nothing to train" in caplog.text
    assert set((tmp_path / "run" / "events").iterdir()) == events
    assert (tmp_path / "run" / checkpoints.CONFIG_FILE).read_text() == saved
    cfg.train.num_steps = 6

    cfg.train.num_steps, cfg.optimizer.grad_clip = 8, 0.0  # clipping's state leaves the tree
    with pytest.raises(TrainingError, match=r"checkpoints/6 holds optimizer state that does not "
                       r"fit .*\(optimizer.grad_clip: 1.0 -> 0.0\): resume with the saved ones, "
                       r"or start a new --workdir with --config.train.init_from="):
        train(cfg, tmp_path / "run")


def test_a_checkpoint_steps_eval_lost_to_a_stop_runs_on_resume(tmp_path, monkeypatch):
    """Checkpoint N is saved before its in-loop eval: a run killed during that eval (or
    stopped by SIGTERM, which skips it) resumed from N without it, and a finished run's re-run
    never wrote its final eval."""
    cfg = testing.tiny_config("gpt")
    cfg.train.num_steps, cfg.checkpoint.save_every = 4, 2
    cfg.train.eval_every, cfg.train.eval_batches = 2, 1
    train(cfg, tmp_path / "ref")
    real = trainer_lib.evaluate

    def evals(workdir):
        return [(r["step"], r["eval/loss"]) for r in read_jsonl(workdir / METRICS_FILE)
                if "eval/loss" in r]

    def killed(*args, **kwargs):
        raise RuntimeError("killed during the eval")

    for steps, name in ((4, "mid"), (2, "final")):
        cfg.train.num_steps = steps
        monkeypatch.setattr(trainer_lib, "evaluate", killed)
        with pytest.raises(RuntimeError, match="killed during the eval"):
            train(cfg, tmp_path / name)
        assert checkpoints.all_steps(tmp_path / name) == [2] and evals(tmp_path / name) == []
        monkeypatch.setattr(trainer_lib, "evaluate", real)
        saved = (tmp_path / name / checkpoints.CONFIG_FILE).read_text()
        log_every, cfg.train.log_every = cfg.train.log_every, 3  # a resume may change it
        with open(tmp_path / name / METRICS_FILE, "ab") as f:
            f.write(b'{"step": 2, "eval/lo\n\0\0\0')  # lines a kill cut short
        assert train(cfg, tmp_path / name).step == steps
        # a re-run that only redoes the eval leaves the saved config as it was
        rewritten = (tmp_path / name / checkpoints.CONFIG_FILE).read_text() != saved
        assert rewritten == (name == "mid")
        cfg.train.log_every = log_every
        want = [e for e in evals(tmp_path / "ref") if e[0] <= steps]
        assert [s for s, _ in evals(tmp_path / name)] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in evals(tmp_path / name)],
                                   [v for _, v in want], rtol=1e-6)
    # Written once: a further re-run of the finished run evaluates nothing again.
    assert train(cfg, tmp_path / "final").step == 2
    assert len(evals(tmp_path / "final")) == 1


def _signal_after_first_log(workdir, sig):
    """Sends `sig` to this process once the run in `workdir` has logged a loss."""
    def send():
        while not (workdir / METRICS_FILE).exists() or not _losses(workdir):
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    threading.Thread(target=send, daemon=True).start()


def test_sigterm_saves_then_resumes_on_another_mesh(tmp_path):
    cfg = testing.tiny_config("gpt")
    cfg.train.num_steps = 100_000
    cfg.checkpoint.save_every = 10_000
    workdir = tmp_path / "run"

    _signal_after_first_log(workdir, signal.SIGTERM)
    result = train(cfg, workdir)
    assert result.preempted and 2 <= result.step < 1000
    assert checkpoints.all_steps(workdir) == [result.step]
    # Resume the preempted run on a (2, 2, 2) mesh for two more steps.
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.train.num_steps = result.step + 2
    more = train(cfg, workdir)
    assert more.step == result.step + 2 and not more.preempted
    assert checkpoints.all_steps(workdir)[-1] == result.step + 2
    assert math.isfinite(more.last_metrics["loss"])
    # Fine-tuning: params-only init from that run, in a new workdir, from step 0.
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
    cfg.train.init_from = str(workdir)
    cfg.train.num_steps = 1
    cfg.train.log_every = 1
    tuned = train(cfg, tmp_path / "finetune")
    first_loss_from_scratch = _losses(workdir)[0][1]
    assert tuned.step == 1
    assert _losses(tmp_path / "finetune")[0][1] < first_loss_from_scratch - 0.2


def test_divergence_names_the_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = testing.tiny_config("gpt")
    cfg.optimizer.learning_rate = 1e30  # step 1 is fine, its update wrecks the params
    cfg.train.num_steps = 6
    cfg.checkpoint.save_every = 1
    cfg.checkpoint.async_save = False
    # Checkpoint 1 holds the wrecked params step 2 started from: not called the last good one.
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step 2 .*no good checkpoint "
                       r"was saved before it; \S+/checkpoints/1 holds the params this step "
                       r"started from \(a re-run resumes from the latest checkpoint: remove"):
        train(cfg, tmp_path)
    assert checkpoints.all_steps(tmp_path) == [1]


def test_non_finite_gradients_stop_the_run_before_their_step_is_saved():
    # A finite loss with NaN gradients makes NaN params: a save at that step would keep them.
    fetched = [(4, {"loss": 2.0, "grad_norm": 1.0}), (5, {"loss": 2.0, "grad_norm": math.nan})]
    with pytest.raises(DivergenceError, match=r"at step 5 \(grad norm nan\); stopped without "
                       r"saving, the last good checkpoint is W/checkpoints/3; W/checkpoints/4 "
                       r"holds the params this step started from"):
        check_finite(fetched, saved_steps=[2, 3, 4], workdir="W")


def test_model_shape_mismatch_is_a_clear_error(tmp_path):
    cfg = testing.tiny_config("gpt")
    checkpoints.write_config(tmp_path, cfg)
    bigger = testing.tiny_config("gpt", d_model=64)
    with pytest.raises(TrainingError, match=r"d_model: 32 -> 64.*--override_config"):
        train(bigger, tmp_path)
    saved = checkpoints.saved_config(tmp_path)
    check_workdir_config(tmp_path, saved, bigger, override=True)  # allowed when asked for
    # With a checkpoint there, the override is no way out for a change of param shapes.
    checkpoints.save_params(tmp_path, {"w": np.zeros(2, np.float32)}, 7)
    with pytest.raises(TrainingError, match=r"d_model: 32 -> 64\); use a new --workdir; "
                       r"--override_config .* checkpoints/7 holds the old model"):
        train(bigger, tmp_path)
    other_lr = testing.tiny_config("gpt")
    other_lr.optimizer.learning_rate = 0.5
    check_workdir_config(tmp_path, saved, other_lr, override=False)  # not a shape change


@pytest.mark.parametrize("name", ["tiny_t5", "tiny_gpt"])
def test_tiny_configs_learn_on_default_corpus(tmp_path, name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    # The preset's model and optimizer; shorter rows and batches keep the test fast.
    cfg.data.inputs_length = cfg.data.seq_len = 64
    cfg.data.targets_length = 16
    cfg.train.batch_size = 8
    cfg.train.num_steps = 30
    cfg.train.log_every = 15
    cfg.train.eval_every = 30
    cfg.train.eval_batches = 2
    cfg.checkpoint.save_every = 30
    result = train(cfg, tmp_path)
    losses = [loss for _, loss in _losses(tmp_path)]
    start = math.log(cfg.model.vocab_size)  # a uniform prediction's loss
    assert losses[1] < losses[0] < start
    assert losses[1] < 0.8 * start, losses
    evals = [r for r in read_jsonl(tmp_path / METRICS_FILE) if "eval/loss" in r]
    assert evals and evals[-1]["eval/loss"] < start - 1.0
    assert result.last_metrics["tokens_per_s"] > 0 and "mfu" not in result.last_metrics
    assert checkpoints.all_steps(tmp_path) == [30]
    assert (tmp_path / checkpoints.VOCAB_FILE).exists()
    assert list((tmp_path / "events").iterdir())


@pytest.mark.parametrize("key", ["checkpoint.save_every", "train.microbatches",
                                 "train.batch_size"])
def test_bad_loop_settings_are_clear_errors_before_anything_is_written(tmp_path, key):
    cfg = testing.tiny_config("gpt")
    section, name = key.split(".")
    cfg[section][name] = 0
    with pytest.raises(TrainingError, match=f"^{re.escape(key)} must be >= 1, got 0$"):
        train(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_an_unset_grad_clip_is_pinned_and_a_resume_keeps_the_saved_one(tmp_path):
    """None: the optimizer's default (adafactor off, adamw 1.0), written into the run's
    config; a workdir saved when Adafactor clipped at 1.0 (its state holds the clipping)
    resumes with 1.0."""
    cfg = testing.tiny_config("t5")
    cfg.optimizer.name, cfg.optimizer.schedule, cfg.optimizer.grad_clip = "adafactor", "rsqrt", None
    trainer_lib._pin_grad_clip(cfg, checkpoints.saved_config(tmp_path / "new"))
    assert cfg.optimizer.grad_clip == 0.0
    old = tmp_path / "old"
    saved = cfg.copy_and_resolve_references()
    saved.optimizer.grad_clip = 1.0
    checkpoints.write_config(old, saved)
    cfg.optimizer.grad_clip = None
    trainer_lib._pin_grad_clip(cfg, checkpoints.saved_config(old))
    assert cfg.optimizer.grad_clip == 1.0
    cfg.optimizer.grad_clip = 0.5  # given: kept
    trainer_lib._pin_grad_clip(cfg, checkpoints.saved_config(old))
    assert cfg.optimizer.grad_clip == 0.5


def test_float16_training_is_refused_before_the_workdir_is_made(tmp_path):
    # No loss scaling: the backward pass of a token-normalised loss underflows in float16.
    cfg = testing.tiny_config("gpt", dtype="float16")
    with pytest.raises(TrainingError, match=r"model.dtype='float16' cannot train: .* use "
                                            r"'bfloat16'"):
        train(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_missing_init_from_is_a_clear_error_before_the_workdir_is_made(tmp_path):
    cfg = testing.tiny_config("gpt")
    cfg.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(checkpoints.CheckpointError, match="nowhere does not exist"):
        train(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_mesh_that_does_not_divide_the_model_is_a_clear_error(tmp_path):
    cfg = testing.tiny_config("gpt")  # 2 heads: not divisible over tensor=4
    cfg.mesh.data, cfg.mesh.tensor = 2, 4
    with pytest.raises(MeshError, match=r"\['decoder'\].* has a dimension of 2 split over mesh "
                       r"axes tensor of size 4, which does not divide it"):
        train(cfg, tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_resuming_with_another_vocabulary_is_refused_unless_overridden(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7)))
             for _ in range(400)]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400))
    other = train_vocab([text], tmp_path / "other", 300)
    wd = tmp_path / "w"
    wd.mkdir()
    shutil.copy(other, wd / checkpoints.VOCAB_FILE)  # a workdir trained on another vocabulary
    cfg = testing.tiny_config("gpt")
    cfg.train.num_steps = 1
    with pytest.raises(TrainingError, match=r"vocab.model \(300 pieces\) is not this run's "
                       r"vocabulary .*8000 pieces.*--override_config"):
        train(cfg, wd)
    assert not (wd / "checkpoints").exists()
    small = testing.tiny_config("gpt", vocab_size=4096)  # fails after the vocabulary check
    with pytest.raises(TrainingError, match="The vocabulary has 8100 ids but model.vocab_size"):
        train(small, wd, override_config=True)
    assert Vocabulary(wd / checkpoints.VOCAB_FILE).sp_size == 300  # a failed run loses nothing
    train(cfg, wd, override_config=True)  # replaces it
    assert Vocabulary(wd / checkpoints.VOCAB_FILE).sp_size == 8000
    train(cfg, wd)  # the same vocabulary resumes (here: nothing left to do)
    cfg.data.extra_ids = 50  # every sentinel id would move
    with pytest.raises(TrainingError, match=r"config.json was written with data.extra_ids=100, "
                       r"this run has 50: .* set --config.data.extra_ids=100, or pass "
                       r"--override_config"):
        train(cfg, wd)
    cfg.train.num_steps = 2
    train(cfg, wd, override_config=True)
    assert checkpoints.read_config(wd).data.extra_ids == 50


def test_ctrl_c_saves_and_stops_and_a_second_one_stops_at_once(tmp_path):
    cfg = testing.tiny_config("gpt")
    cfg.train.num_steps = 100_000
    cfg.checkpoint.save_every = 10_000
    workdir = tmp_path / "run"

    # Python's own Ctrl-C handler, whatever this process started with: a shell without job
    # control starts background commands (e.g. `pytest ... &`) with SIGINT ignored.
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _signal_after_first_log(workdir, signal.SIGINT)
        result = train(cfg, workdir)
        assert result.preempted and 2 <= result.step < 1000
        assert checkpoints.all_steps(workdir) == [result.step]
        # the handler is gone after the run
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # The second press is Python's own KeyboardInterrupt (stop now, no save).
        flag = PreemptionFlag()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in this thread between bytecodes
        assert flag.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        flag.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, original)


def test_an_extended_run_warns_when_its_decay_schedule_stretches():
    saved = testing.tiny_config("gpt")
    saved.optimizer.schedule, saved.optimizer.warmup_steps = "cosine", 10
    saved.train.num_steps = 100
    longer = testing.tiny_config("gpt")
    longer.optimizer = saved.optimizer
    longer.train.num_steps = 200
    note = trainer_lib.resumed_lr_change(saved.to_dict(), longer, 100)
    assert re.fullmatch(r"The learning rate at the resume step 100 changes from 0.001 to "
                        r"0.005872: the cosine decay follows train.num_steps \(100 -> 200\) .*"
                        r"set --config.optimizer.decay_steps=100 to keep the old decay", note), note
    longer.optimizer.decay_steps = 100
    assert trainer_lib.resumed_lr_change(saved.to_dict(), longer, 100) is None
    assert trainer_lib.resumed_lr_change(None, longer, 100) is None  # a params-only checkpoint
    older = saved.to_dict()
    del older["optimizer"]["end_lr_fraction"]  # a config saved before the key existed
    assert trainer_lib.resumed_lr_change(older, longer, 100) is None  # was an AttributeError


def test_an_optimizer_state_of_another_layout_with_the_same_settings_says_so(tmp_path):
    """No setting changed (e.g. a checkpoint from before Adafactor factored attention kernels):
    the line must not claim the settings changed."""
    from t5x_lite.training import trainer
    msg = trainer._optimizer_changed("W/checkpoints/3 holds optimizer state that does not fit",
                                     tmp_path, 3, testing.tiny_config("gpt"))
    assert msg == ("W/checkpoints/3 holds optimizer state that does not fit; the optimizer "
                   "settings are the ones it was saved with, so its state comes from an older "
                   "t5x_lite with another state layout: start a new --workdir with "
                   f"--config.train.init_from={tmp_path} (params only, a fresh optimizer state)")


def test_an_eval_split_that_cannot_be_read_stops_before_training(tmp_path):
    """It stopped at the first in-loop eval, after training up to it and before saving it."""
    from t5x_lite.data import DataConfigError
    from t5x_lite.data import testing as data_testing
    text = tmp_path / "a.txt"
    text.write_text("\n\n".join(data_testing.sentences(200)))
    cfg = testing.tiny_config("gpt")
    cfg.data.source, cfg.data.paths = "text", (str(text),)
    cfg.data.validation_fraction = 0.0  # no validation split at all
    cfg.train.num_steps, cfg.train.eval_every, cfg.checkpoint.save_every = 6, 3, 3
    with pytest.raises(DataConfigError, match="no split 'validation'"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
