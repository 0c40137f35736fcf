"""Distillation: the KL term, kl_weight 0 == plain training, a student learning a frozen
teacher in the trainer's step, and a distillation (+ pruning) run through the trainer."""
import math
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import t5x_lite
from t5x_lite import checkpoints, compression, distillation, lora, partitioning, pruning
from t5x_lite import config as model_config
from t5x_lite.models import LossConfig, build_model
from t5x_lite.training import testing, train, train_state, train_step

V = 128


def _gpt(d=32, layers=1):
    return model_config.gpt2(vocab_size=V, d_model=d, num_heads=2, head_dim=d // 2, d_ff=2 * d,
                             num_layers=layers, max_len=16, dtype="float32")


def _batch(n=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    seq = rng.integers(3, V, size=(n, t + 1)).astype(np.int32)
    return {"decoder_input_tokens": seq[:, :-1], "decoder_target_tokens": seq[:, 1:]}


def _params(cfg, seed):
    return nn.meta.unbox(jax.jit(build_model(cfg).init)(jax.random.key(seed))["params"])


def test_kl_sum_matches_reference_and_vanishes_on_equal_logits():
    s = jax.random.normal(jax.random.key(0), (2, 3, 7))
    t = 3.0 * jax.random.normal(jax.random.key(1), (2, 3, 7))
    w = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]])
    temp = 2.0
    ps, pt = jax.nn.softmax(s / temp), jax.nn.softmax(t / temp)
    want = np.sum(np.sum(pt * (np.log(pt) - np.log(ps)), -1) * w)
    np.testing.assert_allclose(distillation.kl_sum(s, t, w, temp), want, rtol=1e-5)
    assert abs(float(distillation.kl_sum(t, t, w, temp))) < 1e-6


def test_kl_weight_zero_equals_plain_training():
    student = build_model(_gpt())
    teacher = build_model(_gpt(d=64))
    model = distillation.DistillModel(student, teacher, distillation.DistillConfig(
        teacher="unused", kl_weight=0.0, label_weight=1.0))
    params = {"student": _params(_gpt(), 0), "teacher": _params(_gpt(d=64), 1)}
    batch = _batch()
    (loss_d, sums_d), g_d = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(params, batch)
    (loss_p, sums_p), g_p = jax.jit(jax.value_and_grad(student.loss_fn, has_aux=True))(
        params["student"], batch)
    np.testing.assert_allclose(loss_d, loss_p, rtol=1e-6)
    for k in sums_p:
        np.testing.assert_allclose(sums_d[k], sums_p[k], rtol=1e-6)
    for path, g in compression.flat(g_p).items():
        np.testing.assert_allclose(compression.flat(g_d["student"])[path], g, rtol=1e-5,
                                   atol=1e-7, err_msg=path)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_d["teacher"]))  # frozen


def test_loss_is_label_ce_plus_t_squared_forward_kl_per_weighted_token():
    """The objective against numpy from the two models' logits: label_weight * CE +
    kl_weight * T^2 * KL(teacher || student) at temperature T, per weighted token, over the
    weight sum. KL(student || teacher) or a missing T^2 would differ by far more than 1e-5."""
    s_cfg, t_cfg = _gpt(), _gpt(d=64)
    cfg = distillation.DistillConfig(teacher="unused", kl_weight=0.3, label_weight=0.7,
                                     temperature=2.5)
    plain = LossConfig(z_loss=0.0, label_smoothing=0.0)  # the label term is then plain CE
    model = distillation.DistillModel(build_model(s_cfg, plain), build_model(t_cfg), cfg)
    params = {"student": _params(s_cfg, 0), "teacher": _params(t_cfg, 1)}
    batch = _batch()
    w = np.ones(batch["decoder_target_tokens"].shape, np.float32)
    w[:, :3], w[0] = 0.0, 0.5
    batch["decoder_loss_weights"] = w
    loss, sums = jax.jit(model.loss_fn)(params, batch)

    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    s_logits = np.asarray(jax.jit(model.logits)(params, batch))
    t_logits = np.asarray(jax.jit(model.teacher.logits)(params["teacher"], batch))
    tgt = batch["decoder_target_tokens"]
    ce = -np.take_along_axis(log_softmax(s_logits), tgt[..., None], -1)[..., 0]
    log_t, log_s = log_softmax(t_logits / 2.5), log_softmax(s_logits / 2.5)
    kl = np.sum(np.exp(log_t) * (log_t - log_s), -1)
    want = (0.7 * np.sum(ce * w) + 0.3 * 2.5**2 * np.sum(kl * w)) / np.sum(w)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(sums["loss_sum"]), np.sum(ce * w), rtol=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(kl_weight=0.0, label_weight=0.0), "not both 0"),
    (dict(kl_weight=float("nan")), "must be finite"),
    (dict(label_weight=-1.0), "must be finite, >= 0"),
    (dict(temperature=float("nan")), "temperature must be positive and finite"),
    (dict(temperature=0.0), "temperature must be positive"),
])
def test_bad_distill_settings_are_one_line(kw, message):
    with pytest.raises(compression.CompressionError, match=message) as e:
        distillation.DistillConfig(teacher="t", **kw)
    assert "\n" not in str(e.value)


def test_student_learns_teacher_outputs_in_train_step():
    """kl_weight 1, no labels: the student's KL to the teacher on held-out inputs falls; the
    teacher (a bigger, random model) stays bit-identical; optimizer state only for the student."""
    t_cfg, s_cfg = _gpt(d=64, layers=2), _gpt()
    model = distillation.DistillModel(build_model(s_cfg), build_model(t_cfg),
                                      distillation.DistillConfig(teacher="unused", kl_weight=1.0,
                                                                 label_weight=0.0,
                                                                 temperature=1.0))
    mesh = partitioning.make_mesh(4, 2, 1)
    rules = partitioning.DEFAULT_RULES
    tx = compression.freeze_optimizer(optax.adam(3e-3), "student")
    params = {"student": _params(s_cfg, 0), "teacher": _params(t_cfg, 1)}
    state, shardings = train_state.create_train_state(model, tx, mesh, rules, None, params=params)
    assert compression.param_count(state.opt_state) <= 2 * compression.param_count(
        state.params["student"]) + 8
    teacher_before = jax.tree.map(np.asarray, state.params["teacher"])
    step = train_step.jit_train_step(train_step.make_train_step(model, tx, lambda s: 3e-3),
                                     shardings, mesh, rules)
    held_out = _batch(8, 12, seed=99)

    @jax.jit
    def kl_sum(p):
        s = model.logits(p, held_out)
        t = model.teacher.logits(p["teacher"], held_out)
        return distillation.kl_sum(s, t, jnp.ones(s.shape[:2]), 1.0)

    def kl_to_teacher(p):
        return float(kl_sum(p)) / held_out["decoder_input_tokens"].size

    before = kl_to_teacher(state.params)
    for i in range(25):
        batch = jax.device_put(_batch(16, 12, seed=i), partitioning.data_sharding(mesh))
        state, _ = step(state, batch, jax.random.key(0))
    after = kl_to_teacher(state.params)
    assert after < 0.7 * before, (before, after)
    for path, x in compression.flat(teacher_before).items():
        assert np.array_equal(x, np.asarray(compression.flat(state.params["teacher"])[path]))


def test_teacher_must_match_student(tmp_path):
    run = testing.tiny_config("t5")
    checkpoints.write_config(tmp_path, run)
    checkpoints.save_params(tmp_path, _params(model_config.ModelConfig.from_dict(run.model), 0))
    with pytest.raises(compression.CompressionError, match="t5 model but the student is gpt"):
        distillation.teacher_model(tmp_path, _gpt())
    cfg = model_config.ModelConfig.from_dict(run.model)
    import dataclasses
    with pytest.raises(compression.CompressionError, match="vocab_size"):
        distillation.teacher_model(tmp_path, dataclasses.replace(cfg, vocab_size=256))


def test_teacher_rows_must_fit_its_learned_position_table(tmp_path):
    # A student with a longer table (or none) would train on the teacher's NaN logits.
    import ml_collections
    run = testing.tiny_config("gpt")  # learned positions, max_len 32
    checkpoints.write_config(tmp_path, run)
    cfg = model_config.ModelConfig.from_dict(run.model)
    checkpoints.save_params(tmp_path, _params(cfg, 0))
    import dataclasses
    student = dataclasses.replace(cfg, max_len=64)
    distillation.teacher_model(tmp_path, student, data=ml_collections.ConfigDict({"seq_len": 32}))
    with pytest.raises(compression.CompressionError,
                       match=r"data.seq_len=64 is longer than the teacher's max_len=32"):
        distillation.teacher_model(tmp_path, student,
                                   data=ml_collections.ConfigDict({"seq_len": 64}))


def test_teacher_trained_on_another_vocabulary_is_one_line(tmp_path):
    """Same family and vocab_size, but another tokenizer: the KL term would compare token ids
    that are different tokens. Refused before the student's workdir is made; so is such a
    checkpoint as train.init_from."""
    import random
    import shutil

    from t5x_lite.training import TrainingError
    from t5x_lite.vocab import train_vocab
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7)))
             for _ in range(400)]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400))
    run = testing.tiny_config("gpt")
    teacher = tmp_path / "teacher"
    checkpoints.write_config(teacher, run)
    checkpoints.save_params(teacher, _params(model_config.ModelConfig.from_dict(run.model), 0))
    shutil.copy(train_vocab([text], tmp_path / "other", 300), teacher / checkpoints.VOCAB_FILE)
    student = testing.tiny_config("gpt")
    student.distill = dict(teacher=str(teacher))
    with pytest.raises(TrainingError, match=(
            rf"^The teacher {teacher} was trained on another vocabulary \(\S+vocab.model: 300 "
            r"pieces \+ 100 extra ids\) than this run's \(\S+: 8000 pieces \+ 100 extra ids\); "
            r"set --config.data.vocab_path=\S+vocab.model and --config.data.extra_ids=100$")):
        train(student, tmp_path / "student")
    assert not (tmp_path / "student").exists()
    # The same for fine-tuning from it (train.init_from read its params with this run's ids).
    tuned = testing.tiny_config("gpt")
    tuned.train.init_from = str(teacher)
    with pytest.raises(TrainingError, match=rf"^The train.init_from {teacher} was trained on "
                                            r"another vocabulary \(\S+vocab.model: 300 pieces"):
        train(tuned, tmp_path / "tuned")
    assert not (tmp_path / "tuned").exists()


def test_lora_workdir_as_teacher_says_merge_it_first(tmp_path):
    """A LoRA run's checkpoints hold only adapters: one line saying to merge it, before the
    student's workdir is made."""
    run = testing.tiny_config("gpt")
    run.lora = dict(base="/elsewhere", targets="query$", rank=2)
    boxed = jax.eval_shape(lambda: build_model(model_config.ModelConfig.from_dict(
        run.model)).init(jax.random.key(0)))["params"]
    adapters = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.meta.unbox(jax.eval_shape(
        lambda: lora.init_adapters(jax.random.key(1), boxed, lora.LoraConfig(**run.lora)))))
    teacher = tmp_path / "lora"
    checkpoints.write_config(teacher, run)
    checkpoints.save_params(teacher, adapters, 3)
    student = testing.tiny_config("gpt")
    student.distill = dict(teacher=str(teacher))
    with pytest.raises(checkpoints.CheckpointError,
                       match=f"{teacher} is a LoRA run: .* merge them into the base first"):
        train(student, tmp_path / "student")
    assert not (tmp_path / "student").exists()


def test_distill_and_prune_run_through_trainer_and_load(tmp_path):
    """The train command with `distill` + `prune` sections: the checkpoint holds only the
    (pruned) student, which t5x_lite.load reads like any model."""
    teacher_run = testing.tiny_config("gpt", d_model=64, d_ff=128, num_heads=4)
    teacher_dir = tmp_path / "teacher"
    checkpoints.write_config(teacher_dir, teacher_run)
    checkpoints.save_params(
        teacher_dir, _params(model_config.ModelConfig.from_dict(teacher_run.model), 5), 5)
    run = testing.tiny_config("gpt")
    run.train.num_steps = 4
    run.checkpoint.save_every = 4
    run.distill = dict(teacher=str(teacher_dir), temperature=2.0, kl_weight=0.5,
                       label_weight=0.5)
    run.prune = dict(sparsity=0.5, structure="mlp_units")
    workdir = tmp_path / "student"
    result = train(run, workdir)
    assert result.step == 4 and math.isfinite(result.last_metrics["loss"])
    # The first start pins the teacher's step; a resume keeps it after the teacher saves on.
    assert checkpoints.read_config(workdir).distill.teacher_step == 5
    checkpoints.save_params(
        teacher_dir, _params(model_config.ModelConfig.from_dict(teacher_run.model), 9), 9)
    run.train.num_steps = 6
    assert train(run, workdir).step == 6
    assert checkpoints.read_config(workdir).distill.teacher_step == 5
    resumed = compression.from_config(run, None, None, workdir)
    assert resumed.cfg.teacher_step == 5
    run.distill.teacher_step = 9  # another teacher for this student: refused before any work
    with pytest.raises(compression.CompressionError, match="distilled from step 5 of teacher "):
        train(run, workdir)
    run.distill.teacher_step = -1
    # Another teacher path, or a step the path names, is refused too; another spelling of the
    # same workdir is not.
    shutil.copytree(teacher_dir, tmp_path / "teacher_copy")
    for other in (tmp_path / "teacher_copy", teacher_dir / "checkpoints" / "9"):
        run.distill.teacher = str(other)
        with pytest.raises(compression.CompressionError,
                           match=re.escape(f"distill.teacher={other}, but ")
                           + f".* step 5 of teacher {re.escape(str(teacher_dir))};"):
            compression.from_config(run, None, None, workdir)
    for same in (teacher_dir / "checkpoints", teacher_dir / "checkpoints" / "5"):
        run.distill.teacher = str(same)
        assert compression.from_config(run, None, None, workdir).cfg.teacher_step == 5
    run.distill.teacher = str(teacher_dir)
    with pytest.raises(compression.CompressionError, match="no longer has it"):
        distillation.teacher_model(teacher_dir, model_config.ModelConfig.from_dict(run.model), 7)

    student = t5x_lite.load(workdir)
    assert student.config.d_model == 32  # the student, not the teacher
    assert not any("teacher" in k for k in checkpoints.params_shapes(workdir, 6))
    axes = compression.logical_axes(build_model(student.config).init(jax.random.key(0))["params"])
    report = pruning.sparsity_report(jax.device_get(student.params), axes,
                                     pruning.PruneConfig.from_dict(run.prune))
    assert report["unit_sparsity"] == 0.5 and report["sparsity"] == 0.5
    assert np.all(np.isfinite(student.logits([[5, 6, 7]])))


def test_a_relative_teacher_path_is_pinned_absolute(tmp_path, monkeypatch):
    """A relative teacher (or LoRA base) path would be read against wherever a later resume,
    evaluate or infer runs, and could name another workdir there: the pinned path is absolute,
    also when a resume spells it relative again."""
    teacher_run = testing.tiny_config("gpt")
    teacher_dir = tmp_path / "teacher"
    checkpoints.write_config(teacher_dir, teacher_run)
    checkpoints.save_params(
        teacher_dir, _params(model_config.ModelConfig.from_dict(teacher_run.model), 5), 5)
    monkeypatch.chdir(tmp_path)
    run = testing.tiny_config("gpt")
    run.distill = dict(teacher="teacher")
    workdir = tmp_path / "student"
    assert compression.from_config(run, None, None, workdir).cfg.teacher == str(teacher_dir)
    assert run.distill.teacher == str(teacher_dir) and run.distill.teacher_step == 5
    checkpoints.write_config(workdir, run)  # as the trainer saves it
    resumed = testing.tiny_config("gpt")
    resumed.distill = dict(teacher="./teacher/checkpoints")  # the same workdir, spelt relative
    assert compression.from_config(resumed, None, None, workdir).cfg.teacher == str(teacher_dir)
