"""data.mixture: several sources (and objectives of one batch layout) in one run -- entry
checks, proportions, an eval pass over every entry's split, exact resume, and a training run
that evaluates and resumes on a mixture, then goes on without it."""
import json
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_lite.data import DataConfig, DataConfigError, loader, make_dataset, testing
from t5x_lite.evaluation import EvalSettings, outputs, run, text_metrics
from t5x_lite.evaluation.few_shot import FewShotOptions
from t5x_lite.training import testing as train_testing
from t5x_lite.training import train
from t5x_lite.training.metrics_writer import METRICS_FILE, read_jsonl

NUM_PAIRS = 40


@pytest.fixture(scope="module")
def vocab():
    return testing.tiny_vocab(400)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    for i, doc in enumerate(testing.documents(60, seed=5, max_sentences=12)):
        (root / f"doc{i:02d}.txt").write_text(doc)
    (root / "pairs.tsv").write_text("".join(f"question {i} of many\tanswer {i}\n"
                                            for i in range(NUM_PAIRS)))
    return root


def _docs(files):
    return dict(name="docs", source="text", paths=str(files / "doc*.txt"))


def _qa(files, **kw):
    return {"name": "qa", "source": "tsv", "train_paths": str(files / "pairs.tsv"),
            "validation_paths": str(files / "pairs.tsv"), "objective": "seq2seq", **kw}


def _run_cfg(files, mixture, **kw):
    return {"objective": "span_corruption", "data_dir": str(files / "dd"), "inputs_length": 32,
            "targets_length": 8, "pack": False, "read_threads": 0, "mixture": mixture, **kw}


def _alone(files, entry, **kw):
    """The run config reading only `entry`'s source, as a plain (mixture-free) config."""
    entry = {k: v for k, v in entry.items() if k not in ("name", "weight")}
    return {**_run_cfg(files, ()), **kw, **entry}


def _rows(batches, vocab):
    """Decoded inputs of every real row, in order."""
    return [vocab.decode(b["encoder_input_tokens"][r]) for b in batches
            for r in range(len(b["encoder_input_tokens"])) if b["decoder_loss_weights"][r].any()]


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_rows_come_in_proportion_and_are_each_entrys_own(files, vocab):
    cfg = _run_cfg(files, [{**_docs(files), "weight": 3.0}, {**_qa(files), "weight": 1.0}])
    rows = _rows(_take(make_dataset(cfg, vocab, split="train", batch_size=8, seed=1), 4), vocab)
    qa = [r for r in rows if r.startswith("question")]
    assert len(rows) == 32 and len(qa) == 8  # 3 : 1
    # Each entry's rows are what that entry alone makes with its own seed, in its order.
    alone_qa = _rows(_take(make_dataset(_alone(files, _qa(files)), vocab, split="train",
                                        batch_size=8, seed=1), 1), vocab)
    assert len(set(qa)) == 8 and set(qa) <= {f"question {i} of many" for i in range(NUM_PAIRS)}
    assert qa != alone_qa[:8]  # keyed by the entry's name, not the run seed alone
    # Same seed, same batches; the whole mixture is a pure function of (config, seed).
    again = _rows(_take(make_dataset(cfg, vocab, split="train", batch_size=8, seed=1), 4), vocab)
    assert again == rows


def test_row_shares_are_the_weights(files, vocab):
    """5 : 6 gives 40 : 48 of 88 rows (grain truncated the normalised 5/11 and 6/11 to 100 : 119,
    41 : 47); a weight is kept to 1/100 of the smallest one (3 : 7 is 100 : 233)."""
    cfg = _run_cfg(files, [{**_docs(files), "weight": 5}, {**_qa(files), "weight": 6}])
    rows = _rows(_take(make_dataset(cfg, vocab, split="train", batch_size=8, seed=1), 11), vocab)
    qa = sum(r.startswith("question") for r in rows)
    assert (len(rows) - qa, qa) == (40, 48)
    assert loader.mixing_proportions([5 / 11, 6 / 11]) == [100, 120]
    assert loader.mixing_proportions([0.3, 0.7, 0.15]) == [200, 467, 100]


def test_a_mixture_of_one_entry_reads_that_entry(files, vocab):
    """Not the run's own source (the default corpus here): it read that before."""
    cfg = _run_cfg(files, [_qa(files)])
    for split, kw in (("train", {}), ("validation", dict(shuffle=False, repeat=False))):
        rows = _rows(_take(make_dataset(cfg, vocab, split=split, batch_size=8, **kw), 2), vocab)
        assert len(rows) == 16 and all(r.startswith("question ") for r in rows)


def test_eval_pass_covers_every_entrys_split_once(files, vocab):
    """GPT objectives (deterministic rows): the mixture's one pass is each entry's pass alone,
    entry after entry."""
    gpt = dict(objective="causal_lm", seq_len=24, validation_fraction=0.2)
    qa = _qa(files, objective="prompt_completion")
    cfg = _run_cfg(files, [_docs(files), qa], **gpt)

    def rows(c):
        batches = make_dataset(c, vocab, split="validation", batch_size=8, shuffle=False,
                               repeat=False)
        return [vocab.decode(b["decoder_target_tokens"][r]) for b in batches
                for r in range(len(b["decoder_target_tokens"]))
                if b["decoder_loss_weights"][r].any()]

    parts = [rows(_alone(files, e, **gpt)) for e in (_docs(files), qa)]
    assert parts[0] and len(parts[1]) == NUM_PAIRS
    assert rows(cfg) == parts[0] + parts[1]


def test_restore_mid_stream_through_orbax_continues_exactly(files, vocab, tmp_path):
    cfg = _run_cfg(files, [_docs(files), {**_qa(files), "weight": 0.5}], pack=True)
    make = lambda: make_dataset(cfg, vocab, split="train", batch_size=4, seed=3)
    it = make()
    _take(it, 7)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 5)
    fresh = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(7, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(fresh)))
    for x, y in zip(_take(restored["data"], 5), expected):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_entries_follow_the_run_and_own_their_records(files):
    run = DataConfig(source="text", paths=str(files / "doc*.txt"), mixture=[
        dict(weight=2),  # the run's source and paths, another weight
        dict(paths="/b/*.txt"),  # the run's source, its own paths
        dict(source="tsv", train_paths="/c.tsv", objective="seq2seq")])  # nothing of the run's
    a, b, c = run.components()
    assert [p.weight for p in (a, b, c)] == [0.5, 0.25, 0.25]
    assert (a.config.source, a.config.paths) == ("text", (str(files / "doc*.txt"),))
    assert (b.config.source, b.config.paths) == ("text", ("/b/*.txt",))
    assert (c.config.paths, c.config.train_paths, c.config.objective) == ((), ("/c.tsv",),
                                                                          "seq2seq")
    assert c.config.inputs_length == run.inputs_length and not c.config.mixture
    # config.json holds it as JSON; read back, it is the same config.
    again = DataConfig.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again == run and hash(again) == hash(run)
    assert run.components()[0].split(DataConfig(train_split="tr"), "tr[:10]") == "train[:10]"


@pytest.mark.parametrize("mixture, message", [
    ([dict(weight=0)], r"data.mixture\[0\]: weight must be a finite number > 0, got 0"),
    ([dict(weight=float("nan"))], r"weight must be a finite number > 0"),
    ([dict(weight="2")], r"weight must be a finite number > 0, got '2'"),
    ([dict(inputs_length=8)], r"data.mixture\[0\] sets \['inputs_length'\]; an entry sets name, "
                              r"weight and source, .* \(the rest is the run's\)"),
    ([dict(name="a"), dict(name="a")], r"data.mixture\[1\] \(a\): name 'a' is used twice"),
    ([dict(objective="causal_lm")], r"data.mixture\[0\]: objective 'causal_lm' makes other "
                                    r"batches than data.objective='span_corruption'"),
    ([dict(source="text")], r"data.mixture\[0\]: source='text' needs data.paths"),
    ([dict(source="parquet")], r"data.mixture\[0\]: source must be one of"),
    # files under the run's source 'default' (it would read the stdlib docstrings instead)
    ([dict(name="mine", paths="/no/such/*.txt")], r"data.mixture\[0\] \(mine\): data.paths / "
                                                  r"train_paths / validation_paths are read by"),
    ("text", r"mixture must be a list of entries \(dicts\), got str"),
    ([3], r"data.mixture\[0\] must be a dict \(name, weight, source, ...\), got int"),
])
def test_bad_entries_are_one_line(mixture, message):
    with pytest.raises(DataConfigError, match=message) as e:
        DataConfig(mixture=mixture)
    assert "\n" not in str(e.value)


def test_a_run_naming_one_split_twice_cannot_map_an_entrys_two():
    """Entries map the run's split names to theirs by name: with eval_split == train_split,
    'train' meant the entry's eval split, also for the training rows."""
    with pytest.raises(DataConfigError, match=r"data.mixture\[0\] \(c4\) reads train_split="
                                              r"'train' and eval_split='validation', but the "
                                              r"run names both 'train'"):
        DataConfig(eval_split="train", mixture=[dict(name="c4", eval_split="validation")])
    DataConfig(eval_split="train", mixture=[dict(name="c4")])  # the entry's one split too


def test_an_entrys_own_split_is_used_under_a_sliced_run_split():
    """The run's eval_split 'validation[:2]' was looked up whole, so an entry's own eval_split
    was ignored for it (the entry read its validation split)."""
    from t5x_lite.data.config import Component
    run = DataConfig(eval_split="validation[:2]")
    entry = Component("qa", 1.0, DataConfig(eval_split="train", train_split="train"))
    assert entry.split(run, "validation[:2]") == "train[:2]"
    assert entry.split(run, "validation") == "train"
    sliced = Component("qa", 1.0, DataConfig(eval_split="dev[:5]"))
    assert sliced.split(run, "validation[:2]") == "dev[:5]"  # the entry's own slice
    assert entry.split(run, "test") == "test"  # names the run does not use pass through


def test_a_pairs_objective_on_text_names_the_entry(files, vocab):
    cfg = _run_cfg(files, [_docs(files), dict(name="wrong", source="text",
                                               paths=str(files / "doc0*.txt"),
                                               objective="seq2seq")])
    with pytest.raises(Exception, match=r"^data.mixture\[1\] \(wrong\): objective 'seq2seq' "
                                        r"needs inputs/targets pairs"):
        make_dataset(cfg, vocab, split="train", batch_size=2)


def test_an_entrys_unreadable_eval_split_names_the_entry(files, vocab):
    """The start-up check of the in-loop eval, evaluation's sums and its predictions read each
    entry alone: their errors named no entry."""
    from t5x_lite.evaluation import predictions
    from t5x_lite.training import eval_sums
    qa = {**_qa(files), "validation_paths": ()}  # a train split only
    cfg = DataConfig.from_dict(_run_cfg(files, [qa, _docs(files)]))
    message = r"^data.mixture\[0\] \(qa\): .*no split 'validation'"
    with pytest.raises(DataConfigError, match=message):
        eval_sums.check_splits(cfg, vocab, cfg.eval_split, batch_size=2, seed=0)
    with pytest.raises(DataConfigError, match=message):
        eval_sums.mixture_sums(None, None, cfg, vocab, cfg.eval_split, batch_size=2, seed=0,
                               mesh=None)
    with pytest.raises(DataConfigError, match=message):
        predictions.read_examples(cfg, cfg.eval_split)


def test_training_on_a_mixture_evaluates_and_resumes_exactly(files, tmp_path, caplog):
    """T5 on the default corpus (span corruption) mixed with a seq2seq TSV: in-loop eval reads
    both validation splits; stopped at step 4 and resumed, the losses equal a straight run's;
    the evaluator scores each entry; continued without the mixture, the data restarts."""
    def config(steps):
        c = train_testing.tiny_config("t5")
        c.data.mixture = ({"name": "stdlib", "weight": 3.0},
                          {**_qa(files), "weight": 1.0})
        c.train.num_steps, c.train.eval_every, c.train.eval_batches = steps, 4, 2
        c.checkpoint.save_every = 4
        return c

    straight = train(config(8), tmp_path / "straight")
    assert np.isfinite(straight.last_metrics["loss"])
    train(config(4), tmp_path / "resumed")
    train(config(8), tmp_path / "resumed")
    losses = lambda d: [(r["step"], r.get("loss"), r.get("eval/loss"))
                        for r in read_jsonl(d / METRICS_FILE)]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    evals = [r for r in read_jsonl(tmp_path / "straight" / METRICS_FILE) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:  # each entry on its own split, and the two together
        assert set(r) == {"step", "eval/loss", "eval/accuracy", "eval/stdlib/loss",
                          "eval/stdlib/accuracy", "eval/qa/loss", "eval/qa/accuracy"}
        assert min(r["eval/stdlib/loss"], r["eval/qa/loss"]) <= r["eval/loss"] <= max(
            r["eval/stdlib/loss"], r["eval/qa/loss"])
    # The evaluator: each entry alone and all together (token-weighted), and predictions for
    # the entry of pairs only (the stdlib text has nothing to compare).
    (m,) = run(None, tmp_path / "straight", EvalSettings())
    parts = ("stdlib", "qa")
    assert m["tokens"] == sum(m[f"{p}/tokens"] for p in parts)
    assert m["loss"] == pytest.approx(sum(m[f"{p}/loss"] * m[f"{p}/tokens"] for p in parts)
                                      / m["tokens"])
    assert m["num_predictions"] == m["qa/examples"] == NUM_PAIRS
    # A mixture of one entry is scored on that entry (it scored the run's default corpus).
    one = config(8)
    one.data.mixture = (_qa(files),)
    (m,) = run(one, tmp_path / "straight", EvalSettings(name="one", predict="false"))
    assert m["examples"] == m["qa/examples"] == NUM_PAIRS and m["tokens"] == m["qa/tokens"]
    # Two entries of pairs: exact match, BLEU, ... for each one alone too (what the metrics
    # give on its records), and the records say which entry they decode.
    echo = files / "echo.tsv"  # targets = inputs: other scores than qa's
    echo.write_text("".join(f"question {i} of many\tquestion {i} of many\n" for i in range(8)))
    two = config(8)
    two.data.mixture = (_qa(files), dict(name="echo", source="tsv", train_paths=str(echo),
                                         validation_paths=str(echo), objective="seq2seq"))
    (m,) = run(two, tmp_path / "straight", EvalSettings(name="two"))
    records = outputs.read_predictions(tmp_path / "straight" / "eval" / "two", 8)
    assert [r["entry"] for r in records] == ["qa"] * NUM_PAIRS + ["echo"] * 8
    for name in ("qa", "echo"):
        mine = [r for r in records if r["entry"] == name]
        want = text_metrics.compute([r["prediction"] for r in mine],
                                    [r["targets"] for r in mine], ("exact_match", "rouge"))
        assert {k: m[f"{name}/{k}"] for k in want} == pytest.approx(want)
    assert m["qa/rougeL"] != m["echo/rougeL"]
    # Few-shot over the same mixture: each query's shot comes from its own entry's train pairs
    # (the pool: qa's, then echo's), and each entry is scored alone too.
    (m,) = run(two, tmp_path / "straight", EvalSettings(name="fs", few_shot=FewShotOptions(k=1)))
    records = outputs.read_predictions(tmp_path / "straight" / "eval" / "fs", 8)
    assert [r["entry"] for r in records] == ["qa"] * NUM_PAIRS + ["echo"] * 8
    assert all((r["shots"][0] < NUM_PAIRS) == (r["entry"] == "qa") for r in records)
    for name in ("qa", "echo"):
        mine = [r for r in records if r["entry"] == name]
        assert m[f"{name}/exact_match"] == pytest.approx(text_metrics.compute(
            [r["prediction"] for r in mine], [r["targets"] for r in mine],
            ("exact_match",))["exact_match"])

    # Continued without the mixture (another data pipeline): the checkpoint's data state cannot
    # apply; params and optimizer state restore and the data restarts (it read as a damaged
    # checkpoint to remove).
    plain = config(10)
    plain.data.mixture = ()
    with caplog.at_level("WARNING"):
        assert train(plain, tmp_path / "straight").step == 10
    assert re.search(r"the data iterator state in \S+/checkpoints/8 was written by another data "
                     r"pipeline \(.*\); data.mixture changed: params and optimizer state are "
                     r"restored; the data starts from the beginning", caplog.text)
