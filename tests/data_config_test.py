"""Tests for DataConfig: defaults, ConfigDict input, validation messages."""
import ml_collections
import pytest

from t5x_lite.data.config import DataConfig, DataConfigError


def test_defaults_are_t5_pretraining():
    cfg = DataConfig()
    assert (cfg.source, cfg.objective, cfg.inputs_length, cfg.targets_length) == (
        "default", "span_corruption", 512, 114)
    assert (cfg.noise_density, cfg.mean_noise_span_length, cfg.pack) == (0.15, 3.0, True)
    assert cfg.num_workers == 0 and cfg.family == "encoder_decoder"


def test_from_config_dict_and_path_lists():
    cd = ml_collections.ConfigDict({"source": "text", "paths": "/a/*.txt, /b/c.txt",
                                    "objective": "causal_lm", "seq_len": 1024})
    cfg = DataConfig.from_dict(cd)
    assert cfg.paths == ("/a/*.txt", "/b/c.txt")
    assert cfg.family == "decoder_only"
    assert DataConfig.from_dict(cfg) is cfg
    assert DataConfig.from_dict({"objective": "mlm"}).family == "encoder_only"
    assert DataConfig(**cfg.to_dict()) == cfg
    # an empty override (`--config.data.validation_paths=`) means none, not "." (the cwd)
    split = {**cd.to_dict(), "paths": (), "train_paths": ["/a", " "], "validation_paths": ("",)}
    assert DataConfig.from_dict(split).train_paths == ("/a",)
    assert DataConfig.from_dict(split).validation_paths == ()


@pytest.mark.parametrize("overrides,message", [
    ({"objectiv": "mlm"}, "Unknown data config keys"),
    ({"source": "csv"}, "source must be one of"),
    ({"objective": "t5"}, "objective must be one of"),
    ({"source": "tfds"}, "needs data.tfds_name"),
    ({"source": "jsonl"}, "needs data.paths or data.train_paths"),
    ({"source": "text", "paths": "a", "train_paths": "b"}, "not both"),
    # files or a dataset name given without the source that reads them: not the default corpus
    ({"paths": "/data/train.jsonl"}, r"read by source 'text', 'jsonl' or 'tsv' only \(source="
                                     r"'default', the stdlib docstrings\); set data.source"),
    ({"source": "tfds", "tfds_name": "c4", "train_paths": "a"}, r"source='tfds'\); set data"),
    ({"validation_paths": "a"}, "set data.source"),
    ({"tfds_name": "c4/en:3.1.0"}, r"tfds_name is read with source='tfds' only"),
    ({"pack_method": "concat"}, "causal_lm"),
    ({"noise_density": 0.0}, "noise_density"),
    # 1.0 once drawn in float32 (all noise); infinite spans: both hung the length search
    ({"noise_density": 0.99999999}, r"noise_density must be in \(0, 1\) \(below 1 in float32"),
    ({"mean_noise_span_length": float("inf")}, "mean_noise_span_length must be >= 1 and finite"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"seq_len": 1}, ">= 2"),
    ({"prefetch_buffer_size": -5}, "prefetch_buffer_size must be >= 0"),
    ({"worker_buffer_size": 0}, "worker_buffer_size >= 1"),
    ({"document_per": "sentence"}, "document_per"),
])
def test_invalid_configs_fail_with_one_line(overrides, message):
    with pytest.raises(DataConfigError, match=message) as e:
        DataConfig.from_dict(overrides)
    assert "\n" not in str(e.value)
