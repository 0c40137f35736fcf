"""Order-preserving float keys, the bisection over them, and the windowed count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import selection


def test_keys_keep_the_order_of_floats():
    tiny = np.finfo(np.float32).tiny
    # (No subnormals: XLA:CPU flushes them to zero, so they get zero's key, as in its compares.)
    ascending = np.array([-np.inf, -3e38, -1.0, -tiny, 0.0, tiny, 1.0, 3e38, np.inf, np.nan],
                         np.float32)
    keys = np.asarray(selection.order_keys(jnp.asarray(ascending))).astype(np.int64)
    assert np.all(np.diff(keys) > 0)
    assert selection.order_keys(jnp.float32(-0.0)) == selection.order_keys(jnp.float32(0.0))
    # ... under jit too, where XLA folded the `x + 0.0` that made -0.0 into 0.0 away
    zeros = jax.jit(selection.order_keys)(jnp.asarray([-0.0, 0.0], jnp.float32))
    assert zeros[0] == zeros[1]
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 10.0 ** np.arange(
        -20, 20, 0.04)
    np.testing.assert_array_equal(np.argsort(np.asarray(selection.order_keys(jnp.asarray(x))),
                                             kind="stable"), np.argsort(x, kind="stable"))


def test_bisect_finds_the_kth_smallest_per_row():
    x = np.random.default_rng(1).standard_normal((5, 77)).astype(np.float32)
    keys = selection.order_keys(jnp.asarray(x))
    k = np.array([1, 2, 30, 76, 77], np.uint32)

    def test(t_B, keys):
        n = selection.count(keys <= t_B[:, None], axis=-1)
        return n >= k, n

    t, below, _ = jax.jit(lambda keys: selection.bisect(test, (5,), carry=keys))(keys)
    kth = np.sort(x, axis=-1)[np.arange(5), k - 1]
    np.testing.assert_array_equal(t, selection.order_keys(jnp.asarray(kth)))
    np.testing.assert_array_equal(below, k - 1)  # the count just below the k-th smallest


@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 96), (5, 33), (128,)])
def test_count_equals_numpy(shape):
    mask = np.random.default_rng(2).random(shape) < 0.3
    assert int(selection.count(jnp.asarray(mask))) == mask.sum()
    np.testing.assert_array_equal(selection.count(jnp.asarray(mask), axis=-1), mask.sum(-1))


def test_a_zero_tied_with_minus_zero_stays_in_the_top_k_under_jit():
    """HF's TopKLogitsWarper keeps both of two tied values at the cut, -0.0 and 0.0 alike."""
    from t5x_lite.decoding.filtering import SamplingConfig, filter_logits
    logits = jnp.asarray([[1.0, 0.0, -0.0, -2.0]], jnp.float32)
    out = jax.jit(lambda x: filter_logits(x, SamplingConfig(top_k=2)))(logits)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[True, True, True, False]])
