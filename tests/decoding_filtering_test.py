"""Temperature / top-k / top-p / min-p / typical-p / epsilon / eta equal HF's logits warpers;
sampling follows the filtered law."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation import logits_process as hf

from t5x_lite.decoding.filtering import (SamplingConfig, categorical, filter_logits,
                                         select_tokens, token_log_probs)


def _hf_filter(logits, cfg: SamplingConfig):
    scores = torch.tensor(np.asarray(logits))
    warpers = []
    if cfg.temperature not in (0.0, 1.0):
        warpers.append(hf.TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(hf.TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(hf.TopPLogitsWarper(cfg.top_p))
    if cfg.min_p > 0.0:
        warpers.append(hf.MinPLogitsWarper(cfg.min_p))
    if cfg.typical_p < 1.0:
        warpers.append(hf.TypicalLogitsWarper(cfg.typical_p))
    if cfg.epsilon_cutoff > 0.0:
        warpers.append(hf.EpsilonLogitsWarper(cfg.epsilon_cutoff))
    if cfg.eta_cutoff > 0.0:
        warpers.append(hf.EtaLogitsWarper(cfg.eta_cutoff))
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    for w in warpers:  # HF's order: temperature, top-k, top-p, min-p, typical, epsilon, eta
        scores = w(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("cfg", [
    SamplingConfig(top_k=5), SamplingConfig(top_p=0.9), SamplingConfig(top_p=0.3),
    SamplingConfig(temperature=0.7, top_k=20, top_p=0.8),
    SamplingConfig(temperature=1.8, top_p=0.95),
    SamplingConfig(temperature=0.5, top_k=1), SamplingConfig(top_p=1e-6),
    SamplingConfig(min_p=0.05), SamplingConfig(min_p=1.0),
    SamplingConfig(temperature=0.7, top_k=40, top_p=0.95, min_p=0.1),
    SamplingConfig(typical_p=0.9), SamplingConfig(typical_p=0.2), SamplingConfig(typical_p=1e-6),
    SamplingConfig(epsilon_cutoff=3e-3), SamplingConfig(epsilon_cutoff=0.9),
    SamplingConfig(eta_cutoff=3e-3), SamplingConfig(eta_cutoff=0.5),
    SamplingConfig(temperature=1.3, top_k=50, typical_p=0.7, epsilon_cutoff=1e-3,
                   eta_cutoff=2e-3),
])
@pytest.mark.parametrize("shape", [(6, 97), (4, 4096)])  # 4096: counted in windows of 32
def test_masks_equal_hf_warpers(cfg, shape):
    logits = np.random.default_rng(0).normal(0, 3, shape).astype(np.float32)
    ours, theirs = np.asarray(filter_logits(jnp.asarray(logits), cfg)), _hf_filter(logits, cfg)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    kept = ~np.isinf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)
    assert kept.sum(1).min() >= 1


def _reference_filter(logits, cfg: SamplingConfig):
    """The documented rule in numpy, by sorting: HF's, with the ties at the top-p and
    typical-p cuts kept."""
    x = logits.astype(np.float64) / (cfg.temperature or 1.0)
    if 0 < cfg.top_k < x.shape[-1]:
        x = np.where(x < np.sort(x, axis=-1)[:, -cfg.top_k][:, None], -np.inf, x)
    if cfg.top_p < 1.0:
        asc = np.sort(x, axis=-1)
        p = np.exp(asc - asc[:, -1:])
        cum = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
        removed = np.minimum(np.sum(cum <= 1.0 - cfg.top_p, axis=-1), x.shape[-1] - 1)
        x = np.where(x < np.take_along_axis(asc, removed[:, None], axis=-1), -np.inf, x)
    if cfg.typical_p < 1.0:
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = x - x.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            entropy = -np.nansum(np.exp(logp) * logp, axis=-1, keepdims=True)
            distance = np.abs(-logp - entropy)
        order = np.argsort(distance, axis=-1, kind="stable")
        cum = np.cumsum(np.take_along_axis(np.exp(logp), order, axis=-1), axis=-1)
        last = np.minimum(np.sum(cum < cfg.typical_p, axis=-1), x.shape[-1] - 1)
        cut = np.take_along_axis(np.sort(distance, axis=-1), last[:, None], axis=-1)
        x = np.where(distance > cut, -np.inf, x)
    return x


@pytest.mark.parametrize("cfg", [SamplingConfig(top_k=7), SamplingConfig(top_p=0.6),
                                 SamplingConfig(top_k=40, top_p=0.9),
                                 SamplingConfig(temperature=0.7, top_k=100, top_p=0.5),
                                 SamplingConfig(typical_p=0.5), SamplingConfig(typical_p=0.95),
                                 SamplingConfig(top_k=200, typical_p=0.8)])
def test_ties_at_the_cut_are_kept_together(cfg):
    # Logits on a coarse grid: many ties at every threshold, -inf entries, V of a real vocab's
    # shape class (a multiple of 32) and not.
    rng = np.random.default_rng(3)
    for v in (4096, 1001):
        logits = (np.round(rng.normal(0, 2, (5, v))) / 2).astype(np.float32)
        logits[:, :3] = -np.inf
        ours = np.asarray(filter_logits(jnp.asarray(logits), cfg))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(_reference_filter(logits, cfg)))


def test_bad_sampling_config():
    for kw in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(temperature=-1.0),
               dict(min_p=-0.1), dict(min_p=1.1), dict(typical_p=0.0), dict(typical_p=1.01),
               dict(epsilon_cutoff=-0.1), dict(epsilon_cutoff=1.0), dict(eta_cutoff=1.0)):
        with pytest.raises(ValueError):
            SamplingConfig(**kw)


def test_sample_frequencies_follow_filtered_distribution():
    cfg = SamplingConfig(temperature=0.8, top_k=12, top_p=0.9)
    logits_V = np.random.default_rng(1).normal(0, 1.5, 40).astype(np.float32)
    n = 40000
    keys = jax.random.split(jax.random.key(1234), n)
    draw = jax.jit(lambda keys, l: select_tokens(keys, jnp.broadcast_to(l, (n, 40)), cfg))
    counts = np.bincount(np.asarray(draw(keys, logits_V)), minlength=40)
    probs = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits_V[None]), cfg)))[0]
    support = probs > 0
    assert counts[~support].sum() == 0  # never a filtered-out token
    p = probs[support].astype(np.float64)
    _, pvalue = scipy.stats.chisquare(counts[support], n * p / p.sum())
    assert pvalue > 1e-3, pvalue
    assert counts[support].min() > 0  # and every kept token does occur
    # The check has power: the same counts reject the law without the temperature.
    wrong = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits_V[None]),
                                                    SamplingConfig(top_k=12, top_p=0.9))))[0]
    outside = counts[wrong == 0].sum()
    if not outside:
        w = wrong[wrong > 0].astype(np.float64)
        _, p_wrong = scipy.stats.chisquare(counts[wrong > 0], n * w / w.sum())
        assert p_wrong < 1e-6


@pytest.mark.parametrize("v", [300, 4099])  # above argmax's fast-path cut; a partial chunk
def test_categorical_is_jax_random_categorical(v):
    rng = np.random.default_rng(v)
    logits = rng.normal(0, 0.5, (256, v)).astype(np.float32)
    logits[:, rng.permutation(v)[: v // 2]] = -np.inf  # filtered-out entries
    logits[7] = -np.inf
    logits[7, v - 1] = 0.0  # a row whose only candidate is the last entry
    keys = jax.random.split(jax.random.key(5), 256)
    ours = jax.jit(categorical)(keys, jnp.asarray(logits))
    ref = jax.vmap(jax.random.categorical)(keys, jnp.asarray(logits))
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == jnp.int32 and len(np.unique(np.asarray(ours))) > 100
    assert np.all(np.isfinite(logits[np.arange(256), np.asarray(ours)]))


def test_seeds_and_greedy():
    logits = jnp.asarray(np.random.default_rng(2).normal(0, 1, (8, 30)), jnp.float32)
    cfg = SamplingConfig()
    a = select_tokens(jax.random.split(jax.random.key(0), 8), logits, cfg)
    b = select_tokens(jax.random.split(jax.random.key(0), 8), logits, cfg)
    c = select_tokens(jax.random.split(jax.random.key(1), 8), logits, cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = select_tokens(jax.random.split(jax.random.key(1), 8), logits, SamplingConfig(0.0))
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    lp = token_log_probs(logits, greedy)
    np.testing.assert_allclose(lp, np.max(jax.nn.log_softmax(logits), -1), rtol=1e-6)


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1e-38),
                                 SamplingConfig(temperature=1e-40, top_k=5, top_p=0.9)])
def test_a_tiny_temperature_samples_the_argmax(cfg):
    # logits / 1e-38 overflows: the positive logits became +inf ties, the negative ones -inf
    # (a row of them sampled token 0), and top-p's softmax NaN.
    logits = np.random.default_rng(4).normal(0, 3, (16, 97)).astype(np.float32)
    logits[:8] -= 20.0  # every logit negative
    filtered = np.asarray(filter_logits(jnp.asarray(logits), cfg))
    assert not np.isnan(filtered).any()
    np.testing.assert_array_equal(np.argmax(filtered, -1), np.argmax(logits, -1))
    keys = jax.random.split(jax.random.key(0), 16)
    np.testing.assert_array_equal(select_tokens(keys, jnp.asarray(logits), cfg),
                                  np.argmax(logits, -1))
