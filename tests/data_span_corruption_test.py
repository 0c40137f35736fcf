"""Tests for T5 span corruption: lengths, exact reconstruction, statistics, sentinels, errors."""
import collections

import numpy as np
import pytest

from t5x_lite.data import random_spans_helper, span_corrupt
from t5x_lite.data import span_corruption as sc
from t5x_lite.data.config import DataConfig, DataConfigError

VOCAB_SIZE = 32100  # 32000 pieces + 100 sentinels, as T5
SP_SIZE = 32000


def t5_random_spans_helper(inputs_length, noise_density, mean_noise_span_length,
                           extra_tokens_per_span_inputs=1, extra_tokens_per_span_targets=1):
    """Verbatim port of t5.data.preprocessors.random_spans_helper (published T5 code)."""
    def _tokens_length_to_inputs_length_targets_length(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return (num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + 1,
                num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while (_tokens_length_to_inputs_length_targets_length(tokens_length + 1)[0]
           <= inputs_length):
        tokens_length += 1
    inputs_length, targets_length = _tokens_length_to_inputs_length_targets_length(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


@pytest.mark.parametrize("inputs_length", [128, 512, 1024, 2048])
@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.5, 3.0), (0.3, 8.0)])
def test_random_spans_helper_matches_t5(inputs_length, density, mean_span):
    assert (random_spans_helper(inputs_length, density, mean_span)
            == t5_random_spans_helper(inputs_length, density, mean_span))


def test_random_spans_helper_t5_defaults():
    assert random_spans_helper(512, 0.15, 3.0) == (568, 114)
    assert random_spans_helper() == (568, 114)



@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.5, 1.0), (0.05, 8.0)])
def test_helper_lengths_fit_every_chunk_it_allows(density, mean_span):
    # T5's float64 helper and its float32 mask disagree for e.g. 172 at (0.15, 3): 190 raw
    # tokens make 40 targets, not the 38 the formula gave, so every example overflowed its row.
    assert random_spans_helper(172, 0.15, 3.0) == (190, 40)
    rng = np.random.default_rng(0)
    lengths = np.array([sc.corrupted_lengths(n, density, mean_span) for n in range(1, 800)])
    longest_upto = np.maximum.accumulate(lengths, axis=0)  # shorter final chunks must fit too
    for inputs_length in range(2, 700):
        raw, targets_length = random_spans_helper(inputs_length, density, mean_span)
        assert np.all(longest_upto[raw - 1] <= (inputs_length, targets_length)), inputs_length
        if inputs_length % 97 == 0:  # corrupted_lengths is what span_corrupt makes
            out = span_corrupt(np.arange(3, 3 + raw), rng=rng, vocab_size=VOCAB_SIZE,
                               extra_ids=1000, noise_density=density,
                               mean_noise_span_length=mean_span)
            assert (out["inputs"].size, out["targets"].size) == tuple(lengths[raw - 1])

def test_full_chunk_fills_inputs_and_targets_exactly():
    tokens = np.arange(3, 3 + 568)
    out = span_corrupt(tokens, seed=(0, 0), vocab_size=VOCAB_SIZE)
    assert out["inputs"].shape == (512,) and out["targets"].shape == (114,)
    assert out["inputs"].dtype == np.int32 and out["targets"].dtype == np.int32
    assert out["inputs"][-1] == 1 and out["targets"][-1] == 1


@pytest.mark.parametrize("length", [1, 2, 3, 7, 20, 100, 568, 1137])
def test_merging_targets_into_inputs_reconstructs_tokens(length):
    rng = np.random.default_rng(length)
    for seed in range(20):
        tokens = rng.integers(3, SP_SIZE, size=length)
        out = span_corrupt(tokens, seed=(7, seed), vocab_size=VOCAB_SIZE)
        merged = sc.merge_inputs_and_targets(out["inputs"], out["targets"], SP_SIZE)
        np.testing.assert_array_equal(merged, tokens)


def test_noise_count_span_count_and_shape_of_mask():
    length = 568
    for seed in range(200):
        mask = sc.random_spans_noise_mask(length, np.random.default_rng(seed))
        assert mask.sum() == round(length * 0.15) == 85
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        assert len(starts) == round(85 / 3.0) == 28
        assert not mask[0] and mask[-1]  # non-noise first, noise span last, as T5


def test_noise_statistics_over_many_samples():
    rng = np.random.default_rng(0)
    noise, spans, total = 0, 0, 0
    per_position = np.zeros(200)
    for i in range(3000):
        length = int(rng.integers(50, 600))
        mask = sc.random_spans_noise_mask(length, np.random.default_rng((1, i)), 0.15, 3.0)
        noise += mask.sum()
        total += length
        spans += int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
        if length >= 400:
            per_position += mask[100:300]
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.1
    # Away from the edges every position is noise with probability ~density (uniform spans).
    p = per_position / per_position.sum() * 200 * 0.15
    assert np.all(np.abs(p - 0.15) < 0.06)


def test_random_segmentation_is_uniform_over_compositions():
    counts = collections.Counter()
    rng = np.random.default_rng(0)
    for _ in range(8000):
        counts[tuple(sc._random_segmentation(5, 2, rng))] += 1  # pylint: disable=protected-access
    assert set(counts) == {(1, 4), (2, 3), (3, 2), (4, 1)}
    for c in counts.values():
        assert abs(c / 8000 - 0.25) < 0.03


def test_sentinels_assigned_in_order_from_top():
    tokens = np.arange(3, 3 + 568)
    out = span_corrupt(tokens, seed=3, vocab_size=VOCAB_SIZE)
    in_sentinels = [t for t in out["inputs"] if t >= SP_SIZE]
    tgt_sentinels = [t for t in out["targets"] if t >= SP_SIZE]
    expected = list(range(VOCAB_SIZE - 1, VOCAB_SIZE - 1 - 28, -1))  # <extra_id_0>, _1, ...
    assert in_sentinels == expected and tgt_sentinels == expected
    assert out["targets"][0] == VOCAB_SIZE - 1  # targets start with <extra_id_0>
    assert out["inputs"][0] == 3  # inputs start with the first (non-noise) token


def test_same_seed_same_result_and_seeds_differ():
    tokens = np.arange(3, 200)
    a = span_corrupt(tokens, seed=(5, 1), vocab_size=VOCAB_SIZE)
    b = span_corrupt(tokens, seed=(5, 1), vocab_size=VOCAB_SIZE)
    c = span_corrupt(tokens, seed=(5, 2), vocab_size=VOCAB_SIZE)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_error_when_more_spans_than_sentinels():
    tokens = np.arange(3, 3 + 2000)  # round(300 / 3) = 100 spans: fits exactly
    span_corrupt(tokens, seed=0, vocab_size=VOCAB_SIZE, extra_ids=100)
    with pytest.raises(sc.SpanCorruptionError, match="need 105 sentinels.*extra_ids=100"):
        span_corrupt(np.arange(3, 3 + 2100), seed=0, vocab_size=VOCAB_SIZE, extra_ids=100)
    with pytest.raises(sc.SpanCorruptionError, match="extra_ids=0"):
        span_corrupt(tokens[:10], seed=0, vocab_size=SP_SIZE, extra_ids=0)


def test_too_dense_settings_fail_when_the_config_is_made_naming_keys_and_values():
    # 0.9 noise in spans of 1: 460 noise spans in a 511-token chunk, with 51 non-noise tokens
    # to separate them. It used to pass every check and fail at the first batch.
    with pytest.raises(DataConfigError, match=(
            r"data.noise_density=0.9 with data.mean_noise_span_length=1.0 is too dense for "
            r"data.inputs_length=512: a \d+-token chunk needs \d+ noise spans")) as e:
        DataConfig(noise_density=0.9, mean_noise_span_length=1.0, targets_length=2000)
    assert "\n" not in str(e.value)
    with pytest.raises(DataConfigError, match=r"data.targets_length=100; set "
                                              r"data.targets_length=114"):
        DataConfig(targets_length=100)
    with pytest.raises(DataConfigError, match=r"needs 114 sentinels .* extra_ids=100"):
        DataConfig(inputs_length=2048, targets_length=456)
    # only span corruption is checked: the keys are carried by every config
    DataConfig(objective="causal_lm", noise_density=0.9, mean_noise_span_length=1.0)
    assert sc.check_settings(512, 114) == (568, 114)
    assert sc.check_settings(2, 2) == (1, 2)  # 1-token chunks have no noise: not "too dense"
    # long spans at extreme densities make chunks ~1000x the inputs; found in one step
    assert sc.check_settings(512, 10**6, 0.999, 1000.0, None)[0] > 400 * 512
    # within float32 rounding of 1 with very long spans: a bounded search and one line
    with pytest.raises(DataConfigError, match=r"keeps inputs of 512 tokens from more than "
                                              r"16777216 raw tokens per row; lower the density"):
        DataConfig(noise_density=0.9999999, mean_noise_span_length=1e6, targets_length=10**9)


def test_short_last_chunk_at_a_dense_setting_is_corrupted_not_an_error():
    # (0.5, 1.0) fits full chunks, but the short last chunk of a finite (eval) stream can be
    # too short for T5's span count: 3 tokens -> 2 noise in 2 spans, 1 non-noise token.
    # That raised at the end of an eval pass; the spans are now capped at what fits.
    rng = np.random.default_rng(0)
    raw, targets_length = sc.check_settings(64, 64, 0.5, 1.0, 100)
    for length in range(1, raw + 1):
        tokens = np.arange(3, 3 + length)
        out = span_corrupt(tokens, rng=rng, vocab_size=VOCAB_SIZE, noise_density=0.5,
                           mean_noise_span_length=1.0)
        np.testing.assert_array_equal(
            sc.merge_inputs_and_targets(out["inputs"], out["targets"], SP_SIZE), tokens)
        assert (out["inputs"].size, out["targets"].size) == sc.corrupted_lengths(length, 0.5,
                                                                                 1.0)
        assert out["inputs"].size <= 64 and out["targets"].size <= targets_length
