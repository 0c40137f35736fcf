"""Tests for the grain loader: determinism, orbax resume, process shards, eval coverage, globals."""
import collections

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, PartitionSpec

from t5x_lite.data import DataConfigError, make_dataset, make_global_batch
from t5x_lite.data import testing

NUM_PAIRS = 23


@pytest.fixture(scope="module")
def vocab():
    return testing.tiny_vocab(400)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    for i, doc in enumerate(testing.documents(80, seed=7, max_sentences=20)):
        (root / f"doc{i:02d}.txt").write_text(doc)
    (root / "pairs.tsv").write_text("".join(f"question {i} of many\tanswer {i}\n"
                                            for i in range(NUM_PAIRS)))
    return root


def _text_cfg(files, **kw):
    return {"source": "text", "paths": str(files / "doc*.txt"), "data_dir": str(files / "dd"),
            "inputs_length": 64, "targets_length": 16, "seq_len": 48, "packing_bins": 8,
            "read_threads": 0, **kw}


def _pairs_cfg(files, **kw):
    return {"source": "tsv", "train_paths": str(files / "pairs.tsv"), "objective": "seq2seq",
            "validation_paths": str(files / "pairs.tsv"), "data_dir": str(files / "dd"),
            "inputs_length": 32, "targets_length": 8, "pack": False, "read_threads": 0, **kw}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_same_batches_other_seed_other_batches(files, vocab):
    cfg = _text_cfg(files)
    first = _take(make_dataset(cfg, vocab, split="train", batch_size=4, seed=1), 3)
    again = _take(make_dataset(cfg, vocab, split="train", batch_size=4, seed=1), 3)
    other = _take(make_dataset(cfg, vocab, split="train", batch_size=4, seed=2), 3)
    _assert_batches_equal(first, again)
    assert not np.array_equal(first[0]["encoder_input_tokens"], other[0]["encoder_input_tokens"])
    b = first[0]
    assert b["encoder_input_tokens"].shape == (4, 64)
    assert b["decoder_target_tokens"].shape == (4, 16)
    assert all(v.dtype == np.int32 for v in b.values())


@pytest.mark.parametrize("overrides", [
    {"objective": "span_corruption"},
    {"objective": "prefix_lm"},
    {"objective": "mlm", "pack": False},
    {"objective": "causal_lm", "pack_method": "concat"},
])
def test_restore_mid_epoch_through_orbax_continues_exactly(files, vocab, tmp_path, overrides):
    cfg = _text_cfg(files, **overrides)
    make = lambda: make_dataset(cfg, vocab, split="train", batch_size=4, seed=3)
    it = make()
    _take(it, 5)  # mid-epoch: 80 documents make many more than 5 batches
    params = {"w": np.arange(6.0).reshape(2, 3)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                             data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 6)

    fresh = make()
    _take(fresh, 2)  # a restored iterator's own position must not matter
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(5, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(params),
            data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], params["w"])
    _assert_batches_equal(_take(restored["data_iter"], 6), expected)


def _real_rows(batches):
    """(inputs text) of every non-padding row."""
    vocab = testing.tiny_vocab(400)
    out = []
    for b in batches:
        for row in range(b["encoder_input_tokens"].shape[0]):
            if b["decoder_loss_weights"][row].any():
                out.append(vocab.decode(b["encoder_input_tokens"][row]))
            else:  # padding rows are entirely zero
                assert not any(v[row].any() for v in b.values())
    return out


def test_eval_pass_covers_every_example_once_and_pads_the_last_batch(files, vocab):
    batches = list(make_dataset(_pairs_cfg(files), vocab, split="validation", batch_size=4,
                                shuffle=False, repeat=False))
    assert len(batches) == 6  # 23 = 5 * 4 + 3: the remainder batch is kept
    assert batches[-1]["encoder_input_tokens"].shape == (4, 32)
    assert batches[-1]["decoder_loss_weights"][3].sum() == 0
    rows = _real_rows(batches)
    assert rows == [f"question {i} of many" for i in range(NUM_PAIRS)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_get_disjoint_shards_covering_the_data(files, vocab, shuffle):
    per_process = []
    for pi in range(2):
        it = make_dataset(_pairs_cfg(files), vocab, split="validation", batch_size=4,
                          shuffle=shuffle, repeat=False, seed=5, process_index=pi,
                          process_count=2)
        per_process.append(_real_rows(list(it)))
    assert sorted(map(len, per_process)) == [11, 12]
    assert not set(per_process[0]) & set(per_process[1])
    assert collections.Counter(per_process[0] + per_process[1]) == collections.Counter(
        f"question {i} of many" for i in range(NUM_PAIRS))


def test_training_epochs_are_global_permutations_dealt_to_processes(files, vocab):
    rows = []
    for pi, n in ((0, 12), (1, 11)):  # epoch 0 of 23 examples: 12 + 11 rows
        it = make_dataset(_pairs_cfg(files), vocab, split="train", batch_size=n, seed=9,
                          process_index=pi, process_count=2)
        rows += _real_rows([next(it)])
    assert sorted(rows) == sorted(f"question {i} of many" for i in range(NUM_PAIRS))
    assert rows[:12] != [f"question {i} of many" for i in range(0, NUM_PAIRS, 2)]  # shuffled


def test_worker_processes_give_the_same_batches(files, vocab):
    cfg = _text_cfg(files)
    in_process = _take(make_dataset(cfg, vocab, split="train", batch_size=4, seed=1), 2)
    it = make_dataset(cfg, vocab, split="train", batch_size=4, seed=1, num_workers=1)
    try:
        _assert_batches_equal(_take(it, 2), in_process)
    finally:
        it.close()


def test_make_global_batch_shards_the_batch_over_data_and_fsdp():
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    batch = {"decoder_target_tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
             "decoder_loss_weights": np.ones((8, 5), np.int32)}
    out = make_global_batch(batch, mesh)
    x = out["decoder_target_tokens"]
    assert x.shape == (8, 5) and x.dtype == np.int32
    assert x.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(x), batch["decoder_target_tokens"])
    shard_rows = {s.data.shape for s in x.addressable_shards}
    assert shard_rows == {(2, 5)}  # 8 rows over data*fsdp = 4, replicated over tensor
    only_data = make_global_batch(batch, mesh, data_axes=("data", "missing_axis"))
    assert only_data["decoder_target_tokens"].sharding.spec == PartitionSpec(("data",), None)


def test_config_errors(files, vocab):
    with pytest.raises(DataConfigError, match="Unknown data config keys.*noise_densty"):
        make_dataset({"noise_densty": 0.2}, vocab, split="train", batch_size=2)
    with pytest.raises(DataConfigError, match="process_index=2"):
        make_dataset(_pairs_cfg(files), vocab, split="train", batch_size=2, process_index=2,
                     process_count=2)
    with pytest.raises(ValueError, match="needs text documents"):
        make_dataset(_pairs_cfg(files, objective="span_corruption"), vocab, split="train",
                     batch_size=2)
