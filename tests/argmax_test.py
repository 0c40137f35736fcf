"""t5x_lite.argmax equals numpy's argmax (first maximum), ties and -inf rows included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite.argmax import argmax


def _check(x_np):
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x_np)))
    np.testing.assert_array_equal(got, np.argmax(x_np, axis=-1))
    assert got.dtype == np.int32


@pytest.mark.parametrize("v", [300, 32128, 1000, 129, 40])
def test_random_rows(v):
    _check(np.random.default_rng(v).standard_normal((3, 5, v)).astype(np.float32))


def test_ties_pick_the_first_maximum():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (64, 1000)).astype(np.float32)  # many ties at the max
    x[0, [5, 130, 900]] = 10.0  # ties across chunks
    x[1, [200, 201]] = 10.0  # ties inside one chunk
    x[2] = 7.0  # a constant row
    _check(x)


def test_inf_rows_and_the_partial_last_chunk_as_numpy():
    x = np.random.default_rng(1).standard_normal((6, 700)).astype(np.float32)
    x[0] = -np.inf  # all -inf -> 0
    x[1, :650] = -np.inf  # the max sits in the last, partial chunk [640, 700)
    x[2, [30, 699]] = np.inf
    x[3, [600, 650]] = 9.0  # a tie across the last window's overlap with the chunk before
    x[4, 580] = 9.0  # the max in the overlap itself, none in the partial chunk
    x[5, [130, 131]] = -np.inf
    _check(x)


def test_rows_with_nan_get_an_index_of_the_row():
    """XLA:CPU's max ignores NaN: such rows get a valid index (the other rows stay exact)."""
    x = np.random.default_rng(3).standard_normal((3, 700)).astype(np.float32)
    x[0, 450] = np.nan
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    assert 0 <= got[0] < 700
    np.testing.assert_array_equal(got[1:], np.argmax(x[1:], axis=-1))


def test_integer_and_bfloat16():
    rng = np.random.default_rng(2)
    _check(rng.integers(-5, 5, (4, 900)).astype(np.int32))
    x = rng.standard_normal((4, 1024)).astype(jnp.bfloat16)  # bf16 rounding makes ties
    got = np.asarray(argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(x, np.float32), axis=-1))
