"""t5x_lite: small, exact, fast JAX/Flax T5 and GPT training, decoding and evaluation.

`t5x_lite.load(path)` returns a ready model (see `t5x_lite.api`). It is imported lazily so that
light modules (e.g. `t5x_lite.vocab` in data-loader workers) do not pull in jax and flax.
"""
__version__ = "0.1.0"
__all__ = ["load", "LoadedModel", "__version__"]


def __getattr__(name):
    if name in ("load", "LoadedModel"):
        from t5x_lite import api
        return getattr(api, name)
    raise AttributeError(f"module 't5x_lite' has no attribute {name!r}")
