"""Tests for chunking, first-fit packing, padding, segment-wise shifting and batch padding."""
import collections
import json

import grain
import numpy as np
import pytest

from t5x_lite.data import packing


def _iter_ds(items):
    return grain.MapDataset.source(items).to_iter_dataset()


def _random_docs(n, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1000, size=int(rng.integers(0, max_len))).astype(np.int32)
            for _ in range(n)]


def test_chunks_concatenate_back_to_the_documents():
    docs = _random_docs(50)
    chunks = list(packing.ChunkTokensIterDataset(_iter_ds(docs), 17))
    assert all(c.shape == (17,) for c in chunks[:-1]) and 1 <= chunks[-1].size <= 17
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(docs))


@pytest.mark.parametrize("stop_after", [0, 1, 5, 13])
def test_chunk_state_resumes_exactly(stop_after):
    docs = _random_docs(40, seed=1)
    ds = packing.ChunkTokensIterDataset(_iter_ds(docs), 23)
    it = iter(ds)
    for _ in range(stop_after):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (orbax handler)
    rest = list(it)
    it2 = iter(ds)
    it2.set_state(state)
    rest2 = list(it2)
    assert len(rest) == len(rest2) > 0
    for a, b in zip(rest, rest2):
        np.testing.assert_array_equal(a, b)


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        li, lt = int(rng.integers(1, 30)), int(rng.integers(1, 12))
        out.append({"encoder_input_tokens": np.full(li, i + 3, np.int32),
                    "decoder_target_tokens": np.arange(lt, dtype=np.int32) + 1000 * (i + 1),
                    "decoder_loss_weights": np.ones(lt, np.int32)})
    return out


LENGTHS = {"encoder_input_tokens": 32, "decoder_target_tokens": 12, "decoder_loss_weights": 12}


def _unpack(rows):
    """Segments of packed rows -> list of examples (encoder, decoder token tuples)."""
    out = []
    for row in rows:
        for side, key in (("encoder", "encoder_input_tokens"),
                          ("decoder", "decoder_target_tokens")):
            seg, pos = row[f"{side}_segment_ids"], row[f"{side}_positions"]
            assert np.all(row[key][seg == 0] == 0)  # padding is zero
            ids = seg[seg > 0]
            assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
            assert np.all(seg[np.argmax(seg == 0):] == 0) if (seg == 0).any() else True
            for s in np.unique(ids):
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        enc_segs = np.unique(row["encoder_segment_ids"][row["encoder_segment_ids"] > 0])
        dec_segs = np.unique(row["decoder_segment_ids"][row["decoder_segment_ids"] > 0])
        np.testing.assert_array_equal(enc_segs, dec_segs)
        for s in enc_segs:
            out.append((tuple(row["encoder_input_tokens"][row["encoder_segment_ids"] == s]),
                        tuple(row["decoder_target_tokens"][row["decoder_segment_ids"] == s])))
    return out


def test_first_fit_packing_loses_and_duplicates_nothing():
    examples = _examples(200)
    rows = list(packing.pack_or_pad(_iter_ds(examples), LENGTHS, pack=True, num_packing_bins=32))
    for row in rows:
        assert set(row) == {"encoder_input_tokens", "decoder_target_tokens",
                            "decoder_loss_weights", "encoder_segment_ids", "encoder_positions",
                            "decoder_segment_ids", "decoder_positions"}
        assert all(v.dtype == np.int32 for v in row.values())
        assert row["encoder_input_tokens"].shape == (32,)
        np.testing.assert_array_equal(row["decoder_loss_weights"],
                                      (row["decoder_segment_ids"] > 0).astype(np.int32))
    got = collections.Counter(_unpack(rows))
    want = collections.Counter((tuple(e["encoder_input_tokens"]), tuple(e["decoder_target_tokens"]))
                               for e in examples)
    assert got == want
    # It actually packs: close to the bound set by the fuller side (decoder here).
    bound = max(sum(e[k].size for e in examples) / n for k, n in LENGTHS.items())
    assert len(rows) <= 1.3 * bound


def test_pad_without_packing():
    examples = _examples(5)
    rows = list(packing.pack_or_pad(_iter_ds(examples), LENGTHS, pack=False))
    assert len(rows) == 5
    for e, row in zip(examples, rows):
        assert set(row) == set(LENGTHS)
        n = e["encoder_input_tokens"].size
        np.testing.assert_array_equal(row["encoder_input_tokens"][:n], e["encoder_input_tokens"])
        assert np.all(row["encoder_input_tokens"][n:] == 0)


def test_packing_state_resumes_exactly():
    ds = packing.pack_or_pad(_iter_ds(_examples(100, seed=2)), LENGTHS, pack=True,
                             num_packing_bins=4)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)
    it2 = iter(ds)
    it2.set_state(state)
    rest2 = list(it2)
    assert len(rest) == len(rest2)
    for a, b in zip(rest, rest2):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_shift_right_by_segment():
    targets = np.array([7, 8, 5, 1, 3, 9, 1, 8, 4, 0])
    segments = np.array([1, 1, 1, 1, 2, 2, 2, 3, 3, 0])
    np.testing.assert_array_equal(packing.shift_right_by_segment(targets, segments),
                                  [0, 7, 8, 5, 0, 3, 9, 0, 8, 0])
    np.testing.assert_array_equal(packing.shift_right_by_segment(targets),
                                  [0, 7, 8, 5, 1, 3, 9, 1, 8, 4])
    batch = np.stack([targets, targets])
    np.testing.assert_array_equal(packing.shift_right_by_segment(batch, np.stack([segments] * 2)),
                                  np.stack([[0, 7, 8, 5, 0, 3, 9, 0, 8, 0]] * 2))


def test_concat_rows_are_single_segments():
    docs = [np.concatenate([d, [1]]).astype(np.int32) for d in _random_docs(30, seed=4)]
    ds = packing.ChunkTokensIterDataset(_iter_ds(docs), 16).map(packing.ConcatRow(16))
    rows = list(ds)
    stream = np.concatenate([r["decoder_target_tokens"][r["decoder_segment_ids"] > 0]
                             for r in rows])
    np.testing.assert_array_equal(stream, np.concatenate(docs))
    for r in rows[:-1]:
        np.testing.assert_array_equal(r["decoder_segment_ids"], np.ones(16))
        np.testing.assert_array_equal(r["decoder_positions"], np.arange(16))


def test_batch_fn_pads_the_last_batch_with_zero_rows():
    rows = [{"a": np.full(4, i + 1, np.int32), "w": np.ones(4, np.int32)} for i in range(5)]
    batches = list(_iter_ds(rows).batch(2, batch_fn=packing.stack_and_pad_batch(2)))
    assert len(batches) == 3
    assert batches[-1]["a"].shape == (2, 4)
    np.testing.assert_array_equal(batches[-1]["a"], [[5] * 4, [0] * 4])
    np.testing.assert_array_equal(batches[-1]["w"], [[1] * 4, [0] * 4])
