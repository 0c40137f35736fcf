"""Tests for the objectives' feature semantics (names, alignment, masks, splitting, errors)."""
import collections

import grain
import numpy as np
import pytest

from t5x_lite.data import objectives
from t5x_lite.data import span_corruption as sc
from t5x_lite.data import testing


@pytest.fixture(scope="module")
def vocab():
    return testing.tiny_vocab(400)


def _text_ds(token_lists):
    return grain.MapDataset.source(
        [{"tokens": np.asarray(t, np.int32)} for t in token_lists]).to_iter_dataset()


def _pairs_ds(pairs):
    return grain.MapDataset.source(
        [{"inputs": np.asarray(i, np.int32), "targets": np.asarray(t, np.int32)}
         for i, t in pairs]).to_iter_dataset()


def _run(ds, objective, vocab, kind="text", **kw):
    kw = {"inputs_length": 32, "targets_length": 16, "seq_len": 16, "seed": 0, **kw}
    return list(objectives.apply_objective(ds, objective, vocab, kind=kind, **kw))


def test_prefix_lm_matches_seqio_docstring_example(vocab):
    # seqio PrefixLMFeatureConverter docstring: inputs [7, 8, 5, 1] / targets [3, 9, 1] and
    # [8, 4, 9, 3, 1] / [4, 1] packed into 15 positions (EOS is appended by us).
    rows = _run(_pairs_ds([([7, 8, 5], [3, 9]), ([8, 4, 9, 3], [4])]), "prefix_lm", vocab,
                kind="pairs", seq_len=15)
    assert len(rows) == 1
    row = rows[0]
    expected = {
        "decoder_target_tokens": [7, 8, 5, 1, 3, 9, 1, 8, 4, 9, 3, 1, 4, 1, 0],
        "decoder_input_tokens": [0, 7, 8, 5, 1, 3, 9, 0, 8, 4, 9, 3, 1, 4, 0],
        "decoder_loss_weights": [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0],
        "decoder_positions": [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0],
        "decoder_segment_ids": [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0],
        "decoder_causal_attention": [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
    }
    assert set(row) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(row[k], v, err_msg=k)
        assert row[k].dtype == np.int32


def test_prefix_lm_from_text_masks_loss_on_prefix(vocab):
    docs = [np.arange(3, 3 + n) for n in (5, 9, 14)]
    rows = _run(_text_ds(docs), "prefix_lm", vocab, pack=False, seq_len=16)
    assert len(rows) == 3
    for doc, row in zip(docs, rows):
        n = doc.size + 1
        np.testing.assert_array_equal(row["decoder_target_tokens"][:n], np.append(doc, 1))
        prefix = int((row["decoder_loss_weights"][:n] == 0).sum())
        assert 1 <= prefix <= n - 1
        np.testing.assert_array_equal(row["decoder_loss_weights"][:n],
                                      [0] * prefix + [1] * (n - prefix))
        np.testing.assert_array_equal(row["decoder_causal_attention"][:n],
                                      [1] * (prefix + 1) + [0] * (n - prefix - 1))
        assert not row["decoder_loss_weights"][n:].any()


def test_causal_lm_splits_long_documents_and_keeps_every_token(vocab):
    docs = [np.arange(3, 3 + n) for n in (40, 3, 15, 16)]
    ds = _text_ds(docs)
    rows = _run(ds, "causal_lm", vocab, seq_len=16)
    stream = collections.Counter()
    for row in rows:
        seg = row["decoder_segment_ids"]
        for s in np.unique(seg[seg > 0]):
            piece = row["decoder_target_tokens"][seg == s]
            stream[tuple(piece)] += 1
            np.testing.assert_array_equal(row["decoder_input_tokens"][seg == s],
                                          np.concatenate([[0], piece[:-1]]))
        np.testing.assert_array_equal(row["decoder_loss_weights"], (seg > 0).astype(np.int32))
    want = collections.Counter()
    for d in docs:
        full = np.append(d, 1)
        for i in range(0, full.size, 16):
            want[tuple(full[i:i + 16])] += 1
    assert stream == want  # 41 tokens -> 16 + 16 + 9: split, nothing dropped


def test_split_counter_counts_split_documents():
    split = objectives.SplitLongDocuments(8)
    pieces = split.flat_map({"tokens": np.arange(3, 23)})
    assert [p.size for p in pieces] == [8, 8, 5] and split.counter.count == 1
    split.flat_map({"tokens": np.arange(3, 6)})
    assert split.counter.count == 1


def test_causal_lm_unpacked_has_no_segment_features(vocab):
    rows = _run(_text_ds([np.arange(3, 10)]), "causal_lm", vocab, pack=False)
    assert set(rows[0]) == {"decoder_input_tokens", "decoder_target_tokens",
                            "decoder_loss_weights"}


def test_mlm_masks_15_percent_bert_style(vocab):
    docs = [np.random.default_rng(i).integers(3, 400, size=99) for i in range(300)]
    rows = _run(_text_ds(docs), "mlm", vocab, pack=False, inputs_length=100)
    mask_id = vocab.sentinel_id(0)
    counts = collections.Counter()
    for doc, row in zip(docs, rows):
        target = row["encoder_target_tokens"][:100]
        np.testing.assert_array_equal(target, np.append(doc, 1))
        w = row["encoder_loss_weights"].astype(bool)
        assert w.sum() == round(99 * 0.15) and not w[99]  # EOS is never a target
        changed = row["encoder_input_tokens"] != target
        assert not changed[~w].any()  # only chosen positions may change
        chosen_inputs = row["encoder_input_tokens"][w]
        counts["mask"] += int((chosen_inputs == mask_id).sum())
        counts["same"] += int((chosen_inputs == target[w]).sum())
        counts["random"] += int(((chosen_inputs != mask_id) & (chosen_inputs != target[w])).sum())
        assert np.all(chosen_inputs[chosen_inputs != mask_id] < vocab.sp_size)
    total = sum(counts.values())
    assert abs(counts["mask"] / total - 0.8) < 0.02
    assert abs(counts["same"] / total - 0.1) < 0.02  # (random may hit the same id: rarely)
    assert abs(counts["random"] / total - 0.1) < 0.02


def test_mlm_rows_always_have_a_loss_weight(vocab):
    # 31 tokens + EOS fill a 32-token row exactly: a 32-token document leaves an EOS-only
    # piece, and an empty document is EOS only; neither has a token to predict.
    docs = [np.arange(3, 35), np.zeros(0, np.int32), np.arange(3, 13)]
    rows = _run(_text_ds(docs), "mlm", vocab, pack=False)
    assert len(rows) == 2 and all(r["encoder_loss_weights"].sum() > 0 for r in rows)


def test_mlm_packed_feature_names(vocab):
    rows = _run(_text_ds([np.arange(3, 10)] * 3), "mlm", vocab)
    assert set(rows[0]) == {"encoder_input_tokens", "encoder_target_tokens",
                            "encoder_loss_weights", "encoder_segment_ids", "encoder_positions"}


def test_seq2seq_appends_eos_truncates_and_shifts(vocab):
    t = objectives.Seq2Seq(inputs_length=6, targets_length=4)
    rows = _run(_pairs_ds([([5, 6, 7], [8, 9]), (list(range(3, 20)), [8, 9, 10, 11, 12])]),
                "seq2seq", vocab, kind="pairs", inputs_length=6, targets_length=4, pack=False)
    np.testing.assert_array_equal(rows[0]["encoder_input_tokens"], [5, 6, 7, 1, 0, 0])
    np.testing.assert_array_equal(rows[0]["decoder_target_tokens"], [8, 9, 1, 0])
    np.testing.assert_array_equal(rows[0]["decoder_input_tokens"], [0, 8, 9, 1])
    np.testing.assert_array_equal(rows[0]["decoder_loss_weights"], [1, 1, 1, 0])
    np.testing.assert_array_equal(rows[1]["encoder_input_tokens"], [3, 4, 5, 6, 7, 1])
    np.testing.assert_array_equal(rows[1]["decoder_target_tokens"], [8, 9, 10, 1])
    t.map({"inputs": np.arange(3, 20), "targets": np.arange(3, 5)})
    assert t.counter.count == 1
    t.map({"inputs": np.arange(3, 20), "targets": np.arange(3, 20)})  # both sides cut: one pair
    t.map({"inputs": np.arange(3, 8), "targets": np.arange(3, 6)})  # each side just fits
    assert t.counter.count == 2
    p = objectives.PrefixLMFromPairs(8)  # room: inputs 4 + targets 4, or what the other leaves
    rows = [p.map({"inputs": np.arange(3, 3 + n), "targets": np.arange(40, 40 + m)})
            for n, m in ((9, 9), (2, 5), (3, 3), (3, 4))]
    assert [r["decoder_target_tokens"].size for r in rows] == [8, 8, 8, 8]
    assert p.counter.count == 3  # the first pair cut on both sides, the 2nd and 4th on one


def test_span_corruption_rows_reconstruct_the_token_stream(vocab):
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 400, size=int(rng.integers(5, 120))) for _ in range(60)]
    raw, max_targets = sc.random_spans_helper(64)
    rows = _run(_text_ds(docs), "span_corruption", vocab, inputs_length=64,
                targets_length=max_targets, seed=3)
    stream = []
    for row in rows:
        assert row["encoder_input_tokens"].shape == (64,)
        seg_e, seg_d = row["encoder_segment_ids"], row["decoder_segment_ids"]
        for s in np.unique(seg_e[seg_e > 0]):
            merged = sc.merge_inputs_and_targets(row["encoder_input_tokens"][seg_e == s],
                                                 row["decoder_target_tokens"][seg_d == s],
                                                 vocab.sp_size)
            stream.append(merged)
            targets = row["decoder_target_tokens"][seg_d == s]
            np.testing.assert_array_equal(row["decoder_input_tokens"][seg_d == s],
                                          np.concatenate([[0], targets[:-1]]))
    # Chunks are emitted in order, one per segment; all but the last have the raw length.
    assert all(m.size == raw for m in stream[:-1])
    np.testing.assert_array_equal(np.concatenate(stream), np.concatenate(docs))



def test_tokenize_keeps_sentinel_text_beyond_extra_ids_as_text(vocab):
    # A document quoting "<extra_id_150>" (100 sentinels) raised VocabularyError inside the
    # pipeline and stopped training at whatever step reached it.
    out = objectives.Tokenize(vocab).map({"text": "the <extra_id_150> token, <extra_id_0>"})
    assert vocab.decode(out["tokens"]) == "the <extra_id_150> token, <extra_id_0>"
    assert [t for t in out["tokens"] if vocab.is_sentinel(t)] == [vocab.sentinel_id(0)]

def test_objective_input_kind_errors(vocab):
    with pytest.raises(ValueError, match="needs inputs/targets pairs"):
        _run(_text_ds([[3, 4]]), "seq2seq", vocab)
    with pytest.raises(ValueError, match="needs text documents"):
        _run(_pairs_ds([([3], [4])]), "span_corruption", vocab, kind="pairs")
    with pytest.raises(ValueError, match="unknown objective"):
        _run(_text_ds([[3, 4]]), "nope", vocab)


def test_vocab_without_sentinels_is_rejected(vocab):
    from t5x_lite.vocab import Vocabulary

    bare = Vocabulary.from_proto(vocab.model_proto, extra_ids=0)
    with pytest.raises(sc.SpanCorruptionError, match="extra_ids=0"):
        _run(_text_ds([[3, 4]]), "span_corruption", bare, inputs_length=512, targets_length=114)
    with pytest.raises(ValueError, match="MASK"):
        _run(_text_ds([[3, 4]]), "mlm", bare)
    with pytest.raises(sc.SpanCorruptionError, match="needs 114 sentinels"):
        _run(_text_ds([[3, 4]]), "span_corruption", vocab, inputs_length=2048,
             targets_length=456)
    with pytest.raises(ValueError, match="targets_length=114"):
        _run(_text_ds([[3, 4]]), "span_corruption", vocab, inputs_length=512, targets_length=100)


def _mlm_rows(docs, vocab, **kw):
    return _run(_text_ds(docs), "mlm", vocab, **{"inputs_length": 128, "seed": 5, **kw})


def test_mlm_selects_15_percent_of_the_tokens_of_short_documents(vocab):
    """Masking counts per row (packed: many documents), as BERT counts per sequence. Counted per
    document piece, a 1..12-token document had max(1, round(0.15 n)) tokens selected: 15 of
    its 78 tokens over the twelve lengths, 19% instead of 15%."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, vocab.sp_size, n) for n in rng.integers(1, 13, 3000)]
    rows = _mlm_rows(docs, vocab)
    selected = sum(int(r["encoder_loss_weights"].sum()) for r in rows)
    candidates = sum(int((r["encoder_target_tokens"] > 1).sum()) for r in rows)
    assert candidates == sum(d.size for d in docs)  # every token is in some row once
    # Each row selects round(0.15 n_row): off by at most half a token per row, no sampling
    # noise on top (an exact count, not a Bernoulli draw per token).
    assert abs(selected - 0.15 * candidates) <= 0.5 * len(rows), (selected / candidates)


def test_mlm_never_selects_special_tokens_or_sentinels(vocab):
    """Only ordinary pieces are predicted: not EOS, UNK, padding, nor a `<extra_id_N>` that
    the text quoted (the document's literal `<extra_id_0>` reads as [MASK] to the model; it is
    kept as it is, with no loss)."""
    rng = np.random.default_rng(1)
    specials = [2, vocab.sentinel_id(0), vocab.sentinel_id(7)]
    docs = []
    for _ in range(400):
        doc = rng.integers(3, vocab.sp_size, 20)
        doc[rng.choice(20, 8, replace=False)] = rng.choice(specials, 8)
        docs.append(doc)
    docs.append(np.array([2, vocab.sentinel_id(0)]))  # no ordinary token: dropped, as EOS-only
    for pack in (True, False):
        rows = _mlm_rows(docs, vocab, pack=pack, inputs_length=64)
        assert pack or len(rows) == 400  # the special-only document has no row
        for r in rows:
            tgt, inp, w = (r[k] for k in ("encoder_target_tokens", "encoder_input_tokens",
                                          "encoder_loss_weights"))
            ordinary = (tgt >= 3) & (tgt < vocab.sp_size)
            assert w.any() and not w[~ordinary].any()
            np.testing.assert_array_equal(inp[~ordinary], tgt[~ordinary])


def test_mlm_80_10_10_and_uniform_choices_chi_square(vocab):
    """Chi-square tests (seeded; a correct masker fails each with probability 1e-4) of: the
    80/10/10 split of the selected tokens, which positions are selected (uniform over a row's
    tokens) and which random tokens replace them (uniform over the ordinary pieces 3..sp_size-1,
    never a special id or a sentinel)."""
    import scipy.stats

    rng = np.random.default_rng(2)
    docs = [rng.integers(3, vocab.sp_size, 127) for _ in range(600)]  # + EOS = one full row
    rows = _mlm_rows(docs, vocab, pack=False)
    mask_id = vocab.sentinel_id(0)
    kinds = np.zeros(3)  # [MASK], unchanged, random other token
    position_counts = np.zeros(127)
    replacements = []
    for doc, r in zip(docs, rows):
        tgt, inp, w = (r[k] for k in ("encoder_target_tokens", "encoder_input_tokens",
                                      "encoder_loss_weights"))
        np.testing.assert_array_equal(tgt, np.append(doc, 1))
        w = w.astype(bool)
        assert w.sum() == round(127 * 0.15) and not w[127]
        position_counts += w[:127]
        chosen_in, chosen_tgt = inp[w], tgt[w]
        is_mask = chosen_in == mask_id
        same = chosen_in == chosen_tgt
        kinds += [is_mask.sum(), same.sum(), (~is_mask & ~same).sum()]
        replacements += list(chosen_in[~is_mask & ~same])
    n, ordinary = kinds.sum(), vocab.sp_size - 3
    # A random replacement equals the original with probability 1 / ordinary: "unchanged".
    want = n * np.array([0.8, 0.1 + 0.1 / ordinary, 0.1 * (1 - 1 / ordinary)])
    assert scipy.stats.chisquare(kinds, want).pvalue > 1e-4, kinds / n
    assert scipy.stats.chisquare(position_counts).pvalue > 1e-4
    replacements = np.array(replacements)
    assert replacements.min() >= 3 and replacements.max() < vocab.sp_size
    bins = np.bincount((replacements - 3) * 10 // ordinary, minlength=10)
    assert len(replacements) > 1000 and scipy.stats.chisquare(bins).pvalue > 1e-4, bins
