"""Teacher-forced metrics are exact over the whole split: they equal a per-example computation
with LoadedModel.score / logits, with a short last batch, packed or not, T5 or GPT."""
import dataclasses
import re

import numpy as np
import pytest

from t5x_lite.data import DataConfig
from t5x_lite.evaluation import predictions, testing
from t5x_lite.evaluation.teacher_forced import EvalDataError, TeacherForcedScorer
from t5x_lite.vocab import Vocabulary


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("sort")
    paths = testing.write_sort_task(d / "data", num_train=200, num_validation=61)
    return paths, Vocabulary(paths["vocab"], extra_ids=0), str(d / "tfds")


def _data(task, objective, **kw):
    paths, _, data_dir = task
    return DataConfig(source="tsv", train_paths=(paths["train"],),
                      validation_paths=(paths["validation"],), objective=objective,
                      inputs_length=12, targets_length=12, seq_len=24, vocab_path=paths["vocab"],
                      extra_ids=0, data_dir=data_dir, **kw)


@pytest.fixture(scope="module")
def t5(task):
    return testing.random_loaded(testing.tiny_t5(), task[1], scale=3.0)


@pytest.fixture(scope="module")
def gpt(task):
    return testing.random_loaded(testing.tiny_gpt(max_len=32), task[1], scale=3.0)


def _scorer(lm):
    return TeacherForcedScorer(lm.config, lm.mesh, lm.rules)


@pytest.mark.parametrize("pack", [False, True])
def test_t5_metrics_equal_per_example_scores(task, t5, pack):
    data = _data(task, "seq2seq", pack=pack)
    examples = predictions.read_examples(data, "validation")
    assert len(examples) == 61  # 61 = 7 full batches of 8 + a short one
    got = _scorer(t5).evaluate(t5.params, data, t5.vocab, batch_size=8)
    scores = t5.score([e.inputs for e in examples], [e.targets for e in examples])
    tokens = sum(len(t5.vocab.encode(e.targets)) + 1 for e in examples)  # + EOS
    assert got["examples"] == 61 and got["tokens"] == tokens
    assert got["loss"] == pytest.approx(-scores.sum() / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(got["loss"]))
    # Token accuracy by hand: one right-padded batch (padding is masked / causally after).
    tgts = [t5.vocab.encode(e.targets) + [1] for e in examples]
    logits = t5.logits([t5.vocab.encode(e.inputs) + [1] for e in examples],
                       decoder_input_ids=[[0] + t[:-1] for t in tgts])
    correct = sum(int(np.sum(np.argmax(lg[:len(t)], -1) == t)) for lg, t in zip(logits, tgts))
    assert got["token_accuracy"] == pytest.approx(100 * correct / tokens)
    if not pack:
        assert got["batches"] == 8


def test_gpt_prompt_completion_metrics_equal_completion_scores(task, gpt):
    data = _data(task, "prompt_completion", pack=False)
    examples = predictions.read_examples(data, "validation")
    got = _scorer(gpt).evaluate(gpt.params, data, gpt.vocab, batch_size=16)
    prompts = [[0] + gpt.vocab.encode(e.inputs) for e in examples]  # decoder start id first
    completions = [gpt.vocab.encode(e.targets) + [1] for e in examples]
    scores = gpt.score(prompts, completions)
    tokens = sum(map(len, completions))
    assert got["examples"] == 61 and got["tokens"] == tokens
    assert got["loss"] == pytest.approx(-scores.sum() / tokens, rel=1e-5)


def test_family_and_batch_errors(task, t5):
    with pytest.raises(EvalDataError, match="decoder_only batches but the model is a 't5'"):
        _scorer(t5).evaluate(t5.params, _data(task, "prompt_completion"), t5.vocab, batch_size=8)
    with pytest.raises(EvalDataError, match="divisible by data\\*fsdp=8"):
        _scorer(t5).evaluate(t5.params, _data(task, "seq2seq"), t5.vocab, batch_size=12)
    assert dataclasses.is_dataclass(t5.config)


def test_a_batch_shard_on_several_processes_is_refused(task, t5, monkeypatch):
    """Each process evaluates rows of its own: a mesh whose tensor axis crosses processes gave
    them to one shard from both (half-matched batches, a loss over half the tokens)."""
    from t5x_lite import partitioning

    def refused(shape, processes):
        return pytest.raises(partitioning.MeshError, match=re.escape(
            f"mesh (data, fsdp, tensor)=({', '.join(map(str, shape))}) puts each batch shard on "
            f"devices of several processes, but every process loads rows of its own: make "
            f"data*fsdp={shape[0] * shape[1]} a multiple of the {processes} processes"))

    monkeypatch.setattr(partitioning, "_process_of", lambda device: device.id // 4)  # 2 x 4
    for shape in ((1, 2, 4), (2, 1, 4), (1, 8, 1), (2, 2, 2)):  # whole shards per process
        partitioning.check_process_rows(partitioning.make_mesh(*shape))
    with refused((1, 1, 8), 2):
        partitioning.check_process_rows(partitioning.make_mesh(1, 1, 8))
    monkeypatch.setattr(partitioning, "_process_of", lambda device: device.id // 2)  # 4 x 2
    partitioning.check_process_rows(partitioning.make_mesh(1, 4, 2))
    with refused((1, 2, 4), 4):
        TeacherForcedScorer(t5.config, partitioning.make_mesh(1, 2, 4), t5.rules).evaluate(
            t5.params, _data(task, "seq2seq"), t5.vocab, batch_size=8)


def test_sharded_mesh_equals_one_device(task, t5):
    """Teacher-forced sums and batched likelihoods on a (2, 2, 2) mesh (data, fsdp, tensor)
    equal those on a single device (packed rows, a short last batch)."""
    import jax

    from t5x_lite import partitioning
    from t5x_lite.api import LoadedModel
    from t5x_lite.evaluation import likelihood
    from t5x_lite.models import abstract_variables

    data = _data(task, "seq2seq", pack=True)
    boxed = abstract_variables(t5.model)["params"]
    host = jax.device_get(t5.params)
    rows = ([[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]], [[15, 16], [17], [18, 19, 20], [21]])
    got = {}
    for name, mesh in (("one", partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])),
                       ("2x2x2", partitioning.make_mesh(2, 2, 2))):
        params = jax.device_put(host, partitioning.shardings(boxed, mesh, t5.rules))
        lm = LoadedModel(t5.config, t5.run_config, t5.model, params, t5.vocab, mesh, t5.rules)
        got[name] = (TeacherForcedScorer(t5.config, mesh, t5.rules).evaluate(
            params, data, t5.vocab, batch_size=8), likelihood.log_likelihoods(lm, *rows,
                                                                               batch_size=2))
    (one, ll_one), (sharded, ll_sharded) = got["one"], got["2x2x2"]
    assert {k: one[k] for k in ("tokens", "examples", "batches")} == {
        k: sharded[k] for k in ("tokens", "examples", "batches")}
    assert sharded["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert sharded["token_accuracy"] == pytest.approx(one["token_accuracy"], abs=1e-9)
    # x3 random weights make the logits large: float32 sums in another order (tensor-parallel
    # contractions, or just another batch size on one device) move a sum of ~100 by ~0.04.
    np.testing.assert_allclose(ll_sharded, ll_one, rtol=1e-3)


def test_in_loop_eval_equals_the_scorer_over_the_split_or_its_first_batches(task, t5):
    """The trainer's in-loop eval and the scorer share one loop: over the whole split
    (eval_batches=0, or more batches than it has) they agree; eval_batches=k covers exactly the
    first k batches (per-example scores by hand)."""
    import ml_collections

    from t5x_lite.training import trainer

    data = _data(task, "seq2seq", pack=False)  # a batch is 8 examples
    scorer = _scorer(t5)
    want = scorer.evaluate(t5.params, data, t5.vocab, batch_size=8)

    def in_loop(eval_batches):
        config = ml_collections.ConfigDict({"data": data.to_dict(), "seed": 0,
                                            "train": {"eval_batches": eval_batches}})
        return trainer.evaluate(scorer._step, t5.params, config, t5.vocab, t5.mesh, 8)

    for eval_batches in (0, 20):
        got = in_loop(eval_batches)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert 100 * got["accuracy"] == pytest.approx(want["token_accuracy"], rel=1e-6)
    examples = predictions.read_examples(data, "validation")[:16]
    scores = t5.score([e.inputs for e in examples], [e.targets for e in examples])
    tokens = sum(len(t5.vocab.encode(e.targets)) + 1 for e in examples)
    assert in_loop(2)["loss"] == pytest.approx(-scores.sum() / tokens, rel=1e-5)


def test_host_batches_with_a_limit_runs_exactly_that_many_steps(monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    from t5x_lite.training.eval_sums import host_batches

    mine = [{"decoder_loss_weights": np.ones((2, 3), np.int32)}] * 2
    weights = lambda out: [int(b["decoder_loss_weights"].sum()) for b in out]  # noqa: E731
    assert weights(host_batches(iter(mine), limit=4)) == [6, 6, 0, 0]
    assert weights(host_batches(iter(mine), limit=1)) == [6]
    assert weights(host_batches(iter(mine))) == [6, 6]
    assert list(host_batches(iter([]), limit=3)) == []  # one process: nothing to pad with
    # Several processes: with a limit every one runs exactly `limit` steps, no agreement needed.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda *_: 1 / 0)
    assert weights(host_batches(iter(mine), limit=3)) == [6, 6, 0]
    with pytest.raises(EvalDataError, match="this process got no eval data at all"):
        list(host_batches(iter([]), limit=3))


def test_host_batches_pads_a_process_that_runs_out_first(monkeypatch):
    """Simulated 2-process run: this process has 2 batches, the other 4; this one keeps
    stepping with all-zero batches until both are done (the step is a collective)."""
    import jax
    from jax.experimental import multihost_utils

    from t5x_lite.training import eval_sums

    other_left = iter([1, 1, 1, 1, 0])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda alive: np.array([int(alive), next(other_left)]))
    mine = [{"decoder_loss_weights": np.ones((2, 3), np.int32)}] * 2
    out = list(eval_sums.host_batches(iter(mine)))
    assert len(out) == 4
    assert [int(b["decoder_loss_weights"].sum()) for b in out] == [6, 6, 0, 0]
    assert out[3]["decoder_loss_weights"].shape == (2, 3)
