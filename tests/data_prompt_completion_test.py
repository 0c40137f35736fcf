"""The prompt_completion objective: causal rows with the loss on completion + EOS only."""
import json

import grain
import numpy as np
import pytest

import t5x_lite.finetune_templates as ft
from t5x_lite.data import DataConfig, DataConfigError, make_dataset, objectives, testing


@pytest.fixture(scope="module")
def vocab():
    return testing.tiny_vocab(400)


def _pairs_ds(pairs):
    return grain.MapDataset.source(
        [{"inputs": np.asarray(i, np.int32), "targets": np.asarray(t, np.int32)}
         for i, t in pairs]).to_iter_dataset()


def _run(pairs, vocab, **kw):
    kw = {"inputs_length": 32, "targets_length": 16, "seq_len": 12, "seed": 0, **kw}
    return list(objectives.apply_objective(_pairs_ds(pairs), "prompt_completion", vocab,
                                           kind="pairs", **kw))


def test_packed_rows_match_hand_written_features(vocab):
    rows = _run([([7, 8, 5], [3, 9]), ([8, 4], [6])], vocab, seq_len=12)
    assert len(rows) == 1
    expected = {  # prompt (no EOS) + completion + EOS; decoder start 0 per segment
        "decoder_target_tokens": [7, 8, 5, 3, 9, 1, 8, 4, 6, 1, 0, 0],
        "decoder_input_tokens": [0, 7, 8, 5, 3, 9, 0, 8, 4, 6, 0, 0],
        "decoder_loss_weights": [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0],
        "decoder_positions": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0],
        "decoder_segment_ids": [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0],
    }
    assert set(rows[0]) == set(expected)  # no decoder_causal_attention: fully causal
    for k, v in expected.items():
        np.testing.assert_array_equal(rows[0][k], v, err_msg=k)


def test_unpacked_rows_and_truncation_keep_the_prompt_end_and_eos(vocab):
    long_prompt, long_completion = list(range(10, 30)), list(range(40, 60))
    rows = _run([([5, 6], [7]), (long_prompt, [8, 9]), (long_prompt, long_completion)], vocab,
                pack=False, seq_len=8)
    np.testing.assert_array_equal(rows[0]["decoder_target_tokens"], [5, 6, 7, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[0]["decoder_loss_weights"], [0, 0, 1, 1, 0, 0, 0, 0])
    # Over-long prompt: its last tokens stay, next to the completion.
    np.testing.assert_array_equal(rows[1]["decoder_target_tokens"], [25, 26, 27, 28, 29, 8, 9, 1])
    np.testing.assert_array_equal(rows[1]["decoder_loss_weights"], [0, 0, 0, 0, 0, 1, 1, 1])
    # Both too long: the completion keeps at least half the row and its EOS.
    np.testing.assert_array_equal(rows[2]["decoder_target_tokens"], [26, 27, 28, 29, 40, 41, 42, 1])
    np.testing.assert_array_equal(rows[2]["decoder_loss_weights"], [0, 0, 0, 0, 1, 1, 1, 1])


def test_transform_counts_truncations():
    t = ft.PromptCompletion(6)
    t.map({"inputs": np.arange(3, 13), "targets": np.array([4])})
    t.map({"inputs": np.array([3]), "targets": np.array([4])})
    assert t.truncated == 1
    t.map({"inputs": np.arange(3, 13), "targets": np.arange(3, 13)})  # both sides cut: one pair
    assert t.truncated == 2


def test_make_dataset_from_jsonl(tmp_path, vocab):
    pairs = [{"inputs": f"question number {i}", "targets": f"answer {i}"} for i in range(11)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = DataConfig(source="jsonl", train_paths=(str(train),), validation_paths=(str(train),),
                     objective="prompt_completion", seq_len=64, pack=False,
                     data_dir=str(tmp_path / "tfds"))
    assert cfg.family == "decoder_only"
    batches = list(make_dataset(cfg, vocab, split="validation", batch_size=4, shuffle=False,
                                repeat=False))
    assert len(batches) == 3  # 11 pairs: the last batch is padded, nothing dropped
    rows = [(b["decoder_target_tokens"][r], b["decoder_loss_weights"][r],
             b["decoder_input_tokens"][r]) for b in batches for r in range(4)][:11]
    for p, (tgt, w, inp) in zip(pairs, rows):
        prompt, completion = vocab.encode(p["inputs"]), vocab.encode(p["targets"])
        n = len(prompt) + len(completion) + 1
        np.testing.assert_array_equal(tgt[:n], prompt + completion + [1])
        np.testing.assert_array_equal(w[:n], [0] * len(prompt) + [1] * (len(completion) + 1))
        assert inp[0] == 0 and not w[n:].any()
        assert vocab.decode(tgt[len(prompt):n]) == p["targets"]
    assert not batches[-1]["decoder_loss_weights"][3:].any()


def test_prompt_completion_needs_pairs(vocab):
    ds = grain.MapDataset.source([{"tokens": np.arange(3, 9, dtype=np.int32)}]).to_iter_dataset()
    with pytest.raises(ValueError, match="needs inputs/targets pairs"):
        objectives.apply_objective(ds, "prompt_completion", vocab, kind="text", seed=0,
                                   inputs_length=8, targets_length=8, seq_len=8)
    with pytest.raises(DataConfigError, match="objective must be one of"):
        DataConfig(objective="prompt_complete")
