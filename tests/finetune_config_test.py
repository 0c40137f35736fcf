"""Fine-tuning recipes: every configs/finetune_*.py builds a valid run config and model; the
argument string; init_from takes the model, vocabulary and extra_ids from the source run."""
import importlib.util
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, finetune_config
from t5x_lite.config import ModelConfig
from t5x_lite.data import DataConfig
from t5x_lite.data import testing as data_testing
from t5x_lite.defaults import base_config
from t5x_lite.evaluation import testing
from t5x_lite.models import abstract_variables, build_model

CONFIGS = sorted(pathlib.Path(__file__).parent.parent.glob("configs/finetune_*.py"))


def _get_config(path, arg=""):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def gpt_workdir(tmp_path_factory):
    """A params-only GPT checkpoint with a vocabulary, as `convert --from_hf` would write."""
    wd = tmp_path_factory.mktemp("gpt_src")
    model = testing.tiny_gpt(max_len=64)
    config = base_config(model, objective="causal_lm", seq_len=64)
    config.data.extra_ids = 7
    checkpoints.write_config(wd, config)
    data_testing.tiny_vocab(400).copy_to(wd)
    shapes = nn.meta.unbox(abstract_variables(build_model(model))["params"])
    checkpoints.save_params(wd, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), 0)
    return wd


def test_there_are_three_recipes():
    assert [p.stem for p in CONFIGS] == ["finetune_gpt_instruction",
                                         "finetune_gpt_prompt_completion", "finetune_t5_seq2seq"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_builds_valid_config_and_model(path, tmp_path):
    c = _get_config(path, f"train={tmp_path}/a.tsv,validation={tmp_path}/b.tsv,steps=7")
    data = DataConfig.from_dict(c.data)  # unknown keys would raise
    assert data.source == "tsv" and data.train_paths == (f"{tmp_path}/a.tsv",)
    assert data.objective == ("seq2seq" if "t5" in path.stem else "prompt_completion")
    assert c.train.num_steps == 7 and c.train.init_from == "" and c.checkpoint.keep == 0
    model = ModelConfig.from_dict(c.model)
    assert {"t5": "encoder_decoder", "gpt": "decoder_only"}[model.family] == data.family
    shapes = abstract_variables(build_model(model))["params"]
    assert jax.tree.leaves(shapes)
    holdout = _get_config(path, "train=/data/all.jsonl")
    assert holdout.data.source == "jsonl" and tuple(holdout.data.paths) == ("/data/all.jsonl",)


def test_init_from_takes_model_vocab_and_extra_ids(gpt_workdir):
    for path in CONFIGS[:2]:
        c = _get_config(path, f"init_from={gpt_workdir},train=/d/t.jsonl")
        assert c.model.to_dict() == checkpoints.read_config(gpt_workdir).model.to_dict()
        assert c.data.vocab_path == str(gpt_workdir / "vocab.model")
        assert c.data.extra_ids == 7 and c.train.init_from == str(gpt_workdir)
        assert c.data.seq_len == 64  # the recipe's 512 capped at the 64 learned positions
        # A length the user asks for is not cut silently; targets_length is T5's only.
        with pytest.raises(finetune_config.FinetuneConfigError,
                           match=r"inputs_length=65 is longer .* \(max_len=64\)"):
            _get_config(path, f"init_from={gpt_workdir},inputs_length=65")
        assert _get_config(path, f"init_from={gpt_workdir},inputs_length=48").data.seq_len == 48
        with pytest.raises(finetune_config.FinetuneConfigError,
                           match="targets_length=8 is for T5 recipes"):
            _get_config(path, "targets_length=8")
    with pytest.raises(finetune_config.FinetuneConfigError, match="is a 'gpt' model"):
        _get_config(CONFIGS[2], f"init_from={gpt_workdir}")
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        _get_config(CONFIGS[2], f"init_from={gpt_workdir}/missing")


@pytest.mark.parametrize("recipe, key", [("lora_tiny_t5", "base"), ("prune_tiny_t5", "init_from")])
def test_compression_recipes_take_the_model_vocab_and_extra_ids(gpt_workdir, recipe, key):
    """As the fine-tuning recipes do: with the default 100 extra ids, a base trained with 7
    was refused ("trained on another vocabulary")."""
    path = pathlib.Path(__file__).parent.parent / "configs" / f"{recipe}.py"
    c = _get_config(path, f"{key}={gpt_workdir}")
    assert c.model.to_dict() == checkpoints.read_config(gpt_workdir).model.to_dict()
    assert (c.data.vocab_path, c.data.extra_ids) == (str(gpt_workdir / "vocab.model"), 7)


@pytest.mark.parametrize("recipe, full", [("finetune_gpt_prompt_completion", 64),
                                          ("finetune_gpt_instruction", 128)])
def test_gpt_decode_length_leaves_room_for_the_prompt(gpt_workdir, recipe, full):
    """A GPT of max_len 64: rows of 64 tokens; evaluation decodes at most half a row (64, or
    the instruction recipe's 128, new tokens left no room for any prompt, so every
    checkpoint's evaluation failed)."""
    from t5x_lite.evaluation import predictions
    path = next(p for p in CONFIGS if p.stem == recipe)
    c = _get_config(path, f"init_from={gpt_workdir}")
    model = ModelConfig.from_dict(c.model)
    assert c.data.seq_len == model.max_len == 64 and c.decode.max_new_tokens == 32
    prompt = predictions.gpt_prompt(model, list(range(3, 100)), c.decode.max_new_tokens, [0])
    assert len(prompt) == 64 - (32 - 1)  # the start id and the prompt's last 32 tokens
    assert _get_config(path, "").decode.max_new_tokens == full  # 512-token rows


def test_bad_arguments():
    with pytest.raises(finetune_config.FinetuneConfigError, match="bad config argument 'stps=3'"):
        finetune_config.parse_arg("stps=3")
    with pytest.raises(finetune_config.FinetuneConfigError, match="steps must be int"):
        finetune_config.parse_arg("steps=many")
    assert finetune_config.parse_arg("lr=3e-4, batch=8")["lr"] == 3e-4
    for arg in ("validation=/d/dev.tsv", "format=jsonl"):  # were dropped without a word
        with pytest.raises(finetune_config.FinetuneConfigError, match=r"^(validation|format)= "
                                                                      r"needs train="):
            finetune_config.build(arg, family="t5", objective="seq2seq", inputs_length=16,
                                  lr=1e-3, optimizer="adafactor")
    upper = finetune_config.build("train=/d/A.JSONL", family="t5", objective="seq2seq",
                                  inputs_length=16, lr=1e-3, optimizer="adafactor")
    assert upper.data.source == "jsonl"  # was read as TSV
    with pytest.raises(finetune_config.FinetuneConfigError, match="both splits need one format"):
        finetune_config.build("train=/d/a.jsonl,validation=/d/b.tsv", family="t5",
                              objective="seq2seq", inputs_length=16, lr=1e-3,
                              optimizer="adafactor")
    c = finetune_config.build("train=/d/a.jsonl,validation=/d/b.tsv,format=jsonl", family="t5",
                              objective="seq2seq", inputs_length=16, lr=1e-3,
                              optimizer="adafactor")
    assert c.data.source == "jsonl"


def test_init_from_without_a_vocabulary_is_refused(gpt_workdir, tmp_path):
    """A converted HF GPT-2 has no vocab.model: the default vocabulary would be other ids."""
    import shutil
    wd = tmp_path / "no_vocab"
    shutil.copytree(gpt_workdir, wd)
    (wd / checkpoints.VOCAB_FILE).unlink()
    run = checkpoints.read_config(wd)
    run.data.vocab_path = ""
    checkpoints.write_config(wd, run)
    with pytest.raises(finetune_config.FinetuneConfigError, match="has no vocab.model"):
        finetune_config.build(f"init_from={wd}", family="gpt", objective="prompt_completion",
                              inputs_length=64, lr=1e-4, optimizer="adamw")


def test_init_from_an_old_gpt_relative_checkpoint_trains_as_what_it_built(gpt_workdir, tmp_path):
    """Older versions saved GPT configs with position='relative', which built no positions: the
    recipe copies the model as built ('none'), so the run passes the start-up checks (the raw
    saved value was refused there) and keeps every shape."""
    import shutil
    from t5x_lite.training import run_checks
    wd = tmp_path / "old"
    shutil.copytree(gpt_workdir, wd)
    run = checkpoints.read_config(wd)
    run.model.position = "relative"
    checkpoints.write_config(wd, run)
    c = finetune_config.build(f"init_from={wd}", family="gpt", objective="prompt_completion",
                              inputs_length=64, lr=1e-4, optimizer="adamw")
    assert c.model.position == "none"
    run_checks.check_model_for_data(c, ValueError)


@pytest.mark.parametrize("recipe,arg", [("distill_tiny_t5", "init_from=/tmp/t"),
                                        ("lora_tiny_t5", "batch=2"),
                                        ("prune_tiny_t5", "train=/d/a.tsv"),
                                        ("distill_tiny_t5", "inputs_length=512")])
def test_compression_recipes_refuse_the_fine_tuning_keys_they_do_not_read(recipe, arg):
    """They were accepted and ignored (a student from random init, not from init_from=)."""
    path = pathlib.Path(__file__).parent.parent / "configs" / f"{recipe}.py"
    with pytest.raises(finetune_config.FinetuneConfigError,
                       match=rf"^bad config argument '{arg}'; known keys: ") as e:
        _get_config(path, arg)
    assert arg.partition("=")[0] not in str(e.value).partition("known keys: ")[2].split(", ")
    assert _get_config(path, "steps=7").train.num_steps == 7  # their own keys still work
