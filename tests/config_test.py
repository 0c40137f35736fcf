"""ModelConfig: every setting is used by the model it builds or refused; old saved configs load."""
import functools
import glob
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from t5x_lite import checkpoints
from t5x_lite import config as mc
from t5x_lite.gpt import GPT
from t5x_lite.layers import relative_position_bucket
from t5x_lite.models import abstract_variables, build_model
from t5x_lite.training import run_checks, testing

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted(glob.glob(str(REPO / "configs" / "*.py")))
SMALL = dict(vocab_size=128, d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=1)


def _load(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _param_paths(cfg):
    params = nn.meta.unbox(abstract_variables(build_model(cfg))["params"])
    return {"/".join(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: pathlib.Path(p).stem)
def test_every_config_file_passes_the_strict_checks_and_round_trips(path):
    c = _load(path)
    cfg = mc.ModelConfig.from_dict(c.model, upgrade=False)
    run_checks.check_model_for_data(c, ValueError)
    # What config.json holds reads back as the same config.
    assert mc.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), upgrade=False) == cfg


@pytest.mark.parametrize("preset", sorted(mc.PRESETS))
def test_presets_round_trip(preset):
    cfg = mc.from_preset(preset, **SMALL)
    assert mc.ModelConfig.from_dict(cfg.to_dict(), upgrade=False) == cfg


def test_position_defaults_per_family():
    # The dataclass default used to be 'relative' for every family: a bare GPT got no
    # positions at all, silently.
    gpt = mc.ModelConfig(family="gpt", **SMALL)
    assert gpt.position == "learned"
    assert "position_embedder/embedding" in _param_paths(gpt)
    assert mc.ModelConfig(family="bert", **SMALL).position == "learned"
    assert mc.ModelConfig(**SMALL).position == "relative"
    # A dict without the key (a hand-written config) gets the same default, and the resolved
    # value is what to_dict (config.json) holds.
    assert mc.ModelConfig.from_dict({"family": "gpt", **SMALL}).to_dict()["position"] == "learned"


@pytest.mark.parametrize("family, position", [
    ("gpt", "relative"), ("t5", "learned"), ("t5", "rope"), ("t5", "none"), ("bert", "relative"),
    ("bert", "none"),
])
def test_positions_a_family_does_not_build_are_refused(family, position):
    supported = ", ".join(map(repr, mc.FAMILY_POSITIONS[family]))
    with pytest.raises(mc.ConfigError, match=(
            f"^Invalid model config: position='{position}' is not supported for family "
            f"'{family}'; supported: {supported}$")):
        mc.ModelConfig(family=family, position=position, **SMALL)


def test_bert_refuses_an_untied_head():
    with pytest.raises(mc.ConfigError, match="tie_embeddings=False is not supported for family "
                                             "'bert'"):
        mc.bert(tie_embeddings=False, **SMALL)


@pytest.mark.parametrize("preset", ["gpt2", "bert"])
def test_scale_logits_is_t5_only(preset):
    with pytest.raises(mc.ConfigError, match="scale_logits=True only applies to family 't5'"):
        mc.from_preset(preset, scale_logits=True, **SMALL)


def test_gpt_without_positions_is_position_free_and_learned_is_not():
    """'none' (NoPE): logits do not depend on the position ids; 'learned' ones do."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 128, (1, 8)), jnp.int32)
    learned = GPT(mc.gpt2(max_len=16, **SMALL))
    params = jax.jit(learned.init)(jax.random.key(0), tokens)["params"]
    nope_params = {k: v for k, v in params.items() if k != "position_embedder"}
    for model, p, moves in ((learned, params, True),
                            (GPT(mc.gpt2(position="none", **SMALL)), nope_params, False)):
        apply = jax.jit(lambda p, pos, model=model: model.apply({"params": p}, tokens,
                                                                decoder_positions=pos))
        a, b = apply(p, jnp.arange(8)[None]), apply(p, jnp.arange(8)[None] + 5)
        assert (not np.allclose(a, b)) == moves, model.config.position
    assert not any("position" in p for p in _param_paths(mc.gpt2(position="none", **SMALL)))
    assert mc.gpt2(position="none", **SMALL).shape_signature()["max_len"] is None


@pytest.mark.parametrize("saved, key, value", [
    (mc.gpt2, "position", "relative"),  # built no positions
    (mc.t5_1_1, "position", "learned"),  # built the relative bias only, no table
    (mc.bert, "tie_embeddings", False),  # built the tied head
    (mc.gpt2, "scale_logits", True),  # built an unscaled head
])
def test_old_saved_configs_load_as_the_model_they_built(tmp_path, saved, key, value):
    """A config.json written before these settings were refused still loads (with a warning),
    as exactly the params tree it trained; a new run with it is refused with the fix."""
    good = saved(**SMALL)
    built = {"position": {"gpt": "none", "t5": "relative"}.get(good.family), "tie_embeddings": True,
             "scale_logits": False}[key]
    run = testing.tiny_config("t5")
    run.model = {**good.to_dict(), key: value}  # what an old version wrote
    checkpoints.write_config(tmp_path, run)
    old = checkpoints.read_config(tmp_path).model
    loaded = mc.ModelConfig.from_dict(old)
    assert getattr(loaded, key) == built
    assert loaded == mc.ModelConfig.from_dict({**good.to_dict(), key: built})
    if key != "position":  # the position ones differ from the preset (learned / relative)
        assert loaded == good
    with pytest.raises(mc.ConfigError, match="set that to train on from a checkpoint saved"):
        mc.ModelConfig.from_dict(old, upgrade=False)


def test_resuming_an_old_gpt_relative_workdir_with_position_none_matches(tmp_path):
    run = testing.tiny_config("gpt")
    run.model.position = "relative"  # as an old version saved a bare ModelConfig(family="gpt")
    checkpoints.write_config(tmp_path, run)
    run.model.position = "none"  # the fix the refusal names
    saved = checkpoints.saved_config(tmp_path)
    run_checks.check_workdir_config(tmp_path, saved, run, override=False)  # no shape change
    run.model.position = "learned"
    with pytest.raises(run_checks.ConfigMismatchError, match="position: none -> learned"):
        run_checks.check_workdir_config(tmp_path, saved, run, override=False)


@pytest.mark.parametrize("overrides, message", [
    ({"max_len": 0}, "must all be positive"),
    ({"norm_eps": 0.0}, "norm_eps must be > 0, got 0.0"),
    ({"norm_eps": float("nan")}, "norm_eps must be > 0, got nan"),
    ({"num_decoder_layers": 0}, "num_decoder_layers must be positive"),
    ({"relative_buckets": 2}, "relative_buckets must be >= 4, got 2"),
    ({"relative_buckets": 32, "relative_max_distance": 16},
     "relative_max_distance must be > relative_buckets // 2 = 16, got 16"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
    ({"dtype": "float64"}, "dtype must be float32, bfloat16 or float16"),
    ({"remat": "dots_saveable"}, "remat must be one of"),
    ({"norm": "layernorm"}, "norm must be one of"),
    ({"causal_blocks": 0}, "causal_blocks must be >= 1"),
    ({"tie_embeddings": 0}, "tie_embeddings must be bool, got 0"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(mc.ConfigError, match=message):
        mc.t5_1_1(**{**SMALL, **overrides})


def test_rope_theta_is_checked_when_used():
    with pytest.raises(mc.ConfigError, match="rope_theta must be > 0, got 0.0"):
        mc.gpt_modern(rope_theta=0.0, **SMALL)
    with pytest.raises(mc.ConfigError, match="rope_scaling='yarn' needs rope_theta > 1, got 1.0"):
        mc.gpt_modern(rope_theta=1.0, rope_scaling="yarn", rope_scaling_factor=4.0, **SMALL)


@pytest.mark.parametrize("build, key, value", [
    (mc.gpt2, "rope_theta", 1e6),  # learned positions
    (mc.t5_1_1, "rope_theta", 500.0),  # relative bias
    (mc.gpt_modern, "relative_buckets", 8),
    (mc.gpt2, "relative_max_distance", 3),
])
def test_a_setting_the_model_does_not_use_is_refused_and_read_as_default_when_saved(
        build, key, value, caplog):
    """They were accepted, with logits identical to the default's: a setting that changes
    nothing is refused; an old saved config holding one loads as the model it built."""
    with pytest.raises(mc.ConfigError, match=rf"{key}={value!r} only applies with "):
        build(**SMALL, **{key: value})
    saved = {**build(**SMALL).to_dict(), key: value}
    with caplog.at_level("WARNING"):
        assert mc.ModelConfig.from_dict(saved) == build(**SMALL)
    assert f"model.{key}={value!r} only applies with" in caplog.text
    with pytest.raises(mc.ConfigError, match=f"{key}="):  # a new run: refused
        mc.ModelConfig.from_dict(saved, upgrade=False)


@pytest.mark.parametrize("buckets, max_distance", [(32, 128), (6, 100), (128, 100), (64, 50),
                                                   (8, 200), (4, 3)])
def test_relative_buckets_equal_hf_in_and_out_of_jit(buckets, max_distance):
    """HF's T5 bucketing on every distance up to past max_distance, both directions; the
    jitted function too (XLA had folded its float arithmetic into another rounding: (6, 100)
    at distance 10, (128, 100) at 80, (64, 50) at 40 and (8, 200) at 20 were a bucket low)."""
    rel = np.arange(-3 * max_distance, 3 * max_distance + 1)
    for bidirectional in (True, False):
        want = T5Attention._relative_position_bucket(
            torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
            max_distance=max_distance).numpy()
        ours = functools.partial(relative_position_bucket, bidirectional=bidirectional,
                                 num_buckets=buckets, max_distance=max_distance)
        np.testing.assert_array_equal(np.asarray(ours(jnp.asarray(rel))), want)
        np.testing.assert_array_equal(np.asarray(jax.jit(ours)(jnp.asarray(rel))), want)


@pytest.mark.parametrize("buckets", range(4, 40))
def test_relative_bucket_bounds_are_exactly_what_the_bucketing_needs(buckets):
    """The least relative_max_distance allowed keeps every bucket in [0, buckets) in both
    directions; the one below it (refused) does not."""
    rel = jnp.arange(-300, 301)

    def in_range(max_distance):
        return all(bool(jnp.all((b >= 0) & (b < buckets))) for b in (
            relative_position_bucket(rel, True, buckets, max_distance),
            relative_position_bucket(rel, False, buckets, max_distance)))

    least = buckets // 2 + 1
    mc.t5_1_1(relative_buckets=buckets, relative_max_distance=least, **SMALL)
    assert in_range(least)
    with pytest.raises(mc.ConfigError):
        mc.t5_1_1(relative_buckets=buckets, relative_max_distance=least - 1, **SMALL)
    assert not in_range(least - 1)


def test_shape_signature_holds_relative_buckets_for_t5_only():
    # The bias table has relative_buckets rows in T5; GPT and BERT build none, so a changed
    # count there is no shape change (it was reported as one).
    # (A GPT or BERT config now refuses another count; a saved one reads as the default.)
    a, b = (mc.t5_1_1(vocab_size=64, relative_buckets=n) for n in (32, 16))
    assert a.shape_signature() != b.shape_signature()
    for preset in (mc.gpt2, mc.bert):
        saved = {**preset(vocab_size=64).to_dict(), "relative_buckets": 16}
        assert (mc.ModelConfig.from_dict(saved).shape_signature()
                == preset(vocab_size=64).shape_signature())
