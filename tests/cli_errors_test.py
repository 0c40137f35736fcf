"""Bad input on the command line: one error line, nothing written; and every documented config
key can be set with `--config.<section>.<key>=...` (a locked config rejects keys it lacks)."""
import dataclasses
import importlib.util
import logging
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from t5x_lite import checkpoints, cli, distillation, errors, lora, pruning
from t5x_lite.config import ConfigError, ModelConfig
from t5x_lite.data import DataConfig, DataConfigError
from t5x_lite.partitioning import MeshError
from t5x_lite.training import TrainingError, testing, train

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))
# Sections read through a typed dataclass: each config must carry every field as a key.
TYPED_SECTIONS = {"data": DataConfig, "lora": lora.LoraConfig,
                  "distill": distillation.DistillConfig, "prune": pruning.PruneConfig}


def _load(path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_carries_every_typed_key(path):
    config = _load(path)
    for section, cls in TYPED_SECTIONS.items():
        if section in config:
            missing = {f.name for f in dataclasses.fields(cls)} - set(config[section].keys())
            assert not missing, (section, sorted(missing))


def _readme_overrides():
    """(config file, [--config.x.y keys]) of every `python -m t5x_lite.*` command in README.md
    that names a plain config file."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if "-m t5x_lite." not in line:
            continue
        config = re.search(r"--config=(configs/\w+\.py)(?![:\w])", line)
        keys = re.findall(r"--config\.([\w.]+)=", line)
        if config and keys:
            out.append((config.group(1), keys))
    return out


def test_readme_commands_override_keys_the_configs_have():
    cases = _readme_overrides()
    assert len(cases) >= 3
    for path, keys in cases:
        config = _load(REPO / path)
        for key in keys:
            node = config
            for part in key.split("."):
                assert part in node, (path, key)
                node = node[part]


def test_documented_overrides_parse_on_a_locked_config():
    """What the README tells users to type: local files, their splitting, a prune key."""
    argv = ["train", f"--config={REPO / 'configs/prune_tiny_t5.py'}",
            "--config.data.source=text", "--config.data.train_paths=('/a.txt','/b/*.txt')",
            "--config.data.validation_paths=/data/dev.txt", "--config.data.document_per=line",
            "--config.data.pack_method=first_fit", "--config.prune.power=2.0"]
    fv = flags.FlagValues()  # config_flags reads the overrides from sys_argv when defined
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                             lock_config=True, sys_argv=argv)
    fv(argv)
    c = holder.value
    data = DataConfig.from_dict(c.data)
    assert data.source == "text" and data.train_paths == ("/a.txt", "/b/*.txt")
    assert data.validation_paths == ("/data/dev.txt",) and data.document_per == "line"
    assert pruning.PruneConfig(**c.prune).power == 2.0


def test_model_keys_left_none_can_be_overridden():
    """t5_small leaves num_decoder_layers None (= num_layers): the locked config refused to set
    it ("Type NoneType ... is not supported for overriding")."""
    argv = ["train", f"--config={REPO / 'configs/t5_small.py'}",
            "--config.model.num_decoder_layers=4"]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                             lock_config=True, sys_argv=argv)
    fv(argv)
    model = ModelConfig.from_dict(holder.value.model)
    assert (model.num_layers, model.decoder_layers) == (6, 4)
    unset = ModelConfig.from_dict(_load(REPO / "configs/t5_small.py").model)
    assert unset.num_decoder_layers is None and unset.decoder_layers == 6


def test_config_files_may_give_paths_as_a_string_or_a_list():
    c = testing.tiny_config("gpt")
    c.data.source = "text"
    c.data.paths = "/data/a.txt,/data/b.txt"
    assert DataConfig.from_dict(c.data).paths == ("/data/a.txt", "/data/b.txt")
    c.data.paths = ["/data/a.txt"]
    assert DataConfig.from_dict(c.data).paths == ("/data/a.txt",)


def test_exit_with_prints_the_first_line_of_the_message(capsys):
    with pytest.raises(SystemExit) as e:
        cli.exit_with("train", KeyError("'x'\nmore"))
    assert e.value.code == "train: error: 'x'"
    with pytest.raises(SystemExit) as e:
        cli.exit_with("infer", FileNotFoundError(2, "No such file", "/p"))
    assert e.value.code == "infer: error: [Errno 2] No such file: '/p'"


def test_user_errors_share_one_base_class():
    for cls in (TrainingError, ConfigError, DataConfigError, MeshError):
        assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError)


@pytest.mark.parametrize("override, message", [
    ({"train.num_steps": -1}, "train.num_steps must be >= 0"),
    ({"train.batch_size": 0}, "batch_size must be >= 1"),
    ({"data.source": "jsonl"}, "needs data.paths"),
    ({"mesh.data": 3}, r"needs 3 devices"),
    ({"train.batch_size": 16, "train.microbatches": 4},  # 4-row microbatches, 8 shards
     r"train.batch_size=16 in train.microbatches=4 of 4 rows must split evenly over the batch "
     r"shards data\*fsdp=8"),
    # trained silently wrong (ascent; smoothing ignored; no eval), or "diverged" at step 1,
    # or (a normaliser that is no number) failed after the checkpoint directory was made
    ({"train.loss_normalizer": "-1"}, r"train.loss_normalizer must be 'tokens' or a number "
                                      r"> 0, got -1.0"),
    ({"train.loss_normalizer": "0"}, r"train.loss_normalizer must be 'tokens' or a number"),
    ({"train.loss_normalizer": "sequences"}, r"loss_normalizer must be .*got 'sequences'"),
    ({"optimizer.learning_rate": -0.01}, r"optimizer.learning_rate must be a number >= 0, got "
                                         r"-0.01"),
    ({"train.label_smoothing": 1.0}, r"train.label_smoothing must be in \[0, 1\), got 1.0"),
    ({"train.label_smoothing": -0.1}, r"train.label_smoothing must be in \[0, 1\)"),
    ({"train.eval_batches": -1}, r"train.eval_batches must be a number >= 0, got -1"),
    ({"train.z_loss": float("nan")}, r"train.z_loss must be a number >= 0, got nan"),
    ({"optimizer.end_lr_fraction": 1.5}, r"optimizer.end_lr_fraction must be in \[0, 1\]"),
    ({"optimizer.b2": 1.0}, r"optimizer.b2 must be in \[0, 1\), got 1.0"),  # "diverged" at 2
    ({"optimizer.b1": 1.5}, r"optimizer.b1 must be in \[0, 1\), got 1.5"),  # trained on
    ({"optimizer.eps": 0.0}, r"optimizer.eps must be a number > 0, got 0.0"),  # NaN at step 2
    ({"train.log_every": 0}, r"train.log_every must be >= 1, got 0"),
    ({"train.peak_flops": -1.0}, r"train.peak_flops must be a number >= 0, got -1.0"),
    ({"train.num_steps": 0}, r"train.num_steps=0 and --workdir .*/run holds no checkpoint: "
     r"nothing to train; set --config.train.num_steps >= 1$"),  # it wrote config.json, vocab
])
def test_a_config_that_fails_leaves_no_workdir(tmp_path, override, message):
    """No saved config is left behind to disagree with the corrected run."""
    cfg = testing.tiny_config("gpt")
    for key, value in override.items():
        section, name = key.split(".")
        cfg[section][name] = value
    with pytest.raises(errors.UserError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_empty_workdir_is_refused_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--workdir=$UNSET` used to train into it
    with pytest.raises(TrainingError, match="--workdir is empty"):
        train(testing.tiny_config("gpt"), "")
    assert not list(tmp_path.iterdir())


def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(TrainingError, match="is a file, not a directory"):
        train(testing.tiny_config("gpt"), tmp_path / "run")


@pytest.mark.parametrize("args, message", [
    (["--config.train.batch_sise=4"],
     "train: error: unknown config key 'batch_sise' in --config.train.batch_sise; "
     "did you mean 'batch_size'?"),
    (["--config.train.batch_size=0"], "train: error: train.batch_size must be >= 1, got 0"),
    # ml_collections' own tracebacks before
    (["--config.train.batch-size=4"], "train: error: --config.train.batch-size: not a config key "
     "path (names of letters, digits and _ joined by dots)"),
    (["--config.data.paths[0]=a.txt"], "train: error: --config.data.paths[0]: not a config key "
     "path (names of letters, digits and _ joined by dots)"),
    (["--config.mesh.rules.x=1"], 're:train: error: cannot apply --config.mesh.rules.x: Override '
     'mesh.rules.x can not be applied because field "rules" is None'),
    (["--config.train.num_steps.x=1"], "train: error: --config.train.num_steps.x: "
     "train.num_steps is a int, which has no key 'x'"),  # it named a key 'Attribute'
    (["stray"], "train: error: unexpected arguments ['stray']"),
    (["--config=configs/nope.py"],
     "train: error: --config: [Errno 2] No such file or directory: 'configs/nope.py'"),
    (["--config=configs/finetune_t5_seq2seq.py:stepz=10"],
     "train: error: bad config argument 'stepz=10'; known keys: batch, format, init_from, "
     "inputs_length, lr, save_every, steps, targets_length, train, validation"),
])
def test_train_cli_prints_one_error_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "t5x_lite.train", "--config=configs/tiny_gpt.py",
                        f"--workdir={tmp_path / 'run'}", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert (re.match(message[3:], last) if message.startswith("re:") else last == message), \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("def get_config(:\n    pass\n", "bad.py:1: SyntaxError: invalid syntax"),
    ("import os\n\ndef get_config():\n    return os.nope\n",
     "bad.py:4: AttributeError: module 'os' has no attribute 'nope'"),
    # absl wraps these three (config_flags: a traceback in the text; or a lazy placeholder)
    ("def get_config():\n    raise ValueError('boom')\n", "bad.py:2: ValueError: boom"),
    ("def get_config():\n    n = 3\n    return n + 'a'\n",
     "bad.py:3: TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
    ("def get_config():\n    raise OSError('disk')\n", "bad.py:2: OSError: disk"),
    # raised while handling another exception: the user's own error, not the one it handled
    ("def get_config():\n    try:\n        {}['big']\n    except KeyError:\n"
     "        raise ValueError('unknown preset big') from None\n",
     "bad.py:5: ValueError: unknown preset big"),
])
def test_a_config_file_that_fails_to_run_is_one_line_naming_its_line(tmp_path, text, message):
    (tmp_path / "bad.py").write_text(text)
    r = subprocess.run([sys.executable, "-m", "t5x_lite.train", f"--config={tmp_path}/bad.py",
                        f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"train: error: --config: {tmp_path}/{message}"
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, name, text, message", [
    ("train", "noget.py", "X = 1\n", "the file defines no get_config()"),
    # evaluate used to evaluate with the workdir's own config.json and exit 0
    ("evaluate", "none.py", "def get_config():\n    c = 1\n",
     "get_config() returned NoneType, not an ml_collections ConfigDict (a missing return?)"),
    ("train", "dict.py", "def get_config():\n    return {'train': {}}\n",
     "get_config() returned dict, not an ml_collections ConfigDict"),
    ("train", "config.json", '{"seed": 0, "debug": true}\n',
     "{path}/config.json:1: NameError: name 'true' is not defined (a config is a Python file "
     "with get_config(), e.g. configs/tiny_t5.py)"),
])
def test_a_config_file_that_is_no_config_is_one_line(tmp_path, command, name, text, message):
    (tmp_path / name).write_text(text)
    workdir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", f"t5x_lite.{command}",
                        f"--config={tmp_path}/{name}", f"--workdir={workdir}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    want = f"{command}: error: --config: " + message.replace("{path}", str(tmp_path))
    assert r.stderr.strip().splitlines()[-1] == want, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not workdir.exists()


@pytest.mark.parametrize("args, message", [
    (["--few_shot_k=-5"], "--few_shot_k must be >= 0 (shots per prompt) or -1 (no few-shot "
                          "evaluation), got -5"),
    (["--few_shot_template={inputs} = {targets}", "--few_shot_pool=p.jsonl"],
     "--few_shot_template, --few_shot_pool without --few_shot_k (shots per prompt, 0 for "
     "zero-shot) would be ignored"),
])
def test_few_shot_flags_that_would_be_ignored_are_one_line(tmp_path, args, message):
    """Both ran a plain evaluation, as if the few-shot flags had not been given."""
    r = subprocess.run([sys.executable, "-m", "t5x_lite.evaluate", f"--workdir={tmp_path}",
                        *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"evaluate: error: {message}", r.stderr[-3000:]


def test_config_overrides_without_a_config_file_say_what_is_missing(tmp_path):
    """evaluate's --config is optional (the workdir's config.json): its overrides are not."""
    r = subprocess.run([sys.executable, "-m", "t5x_lite.evaluate", f"--workdir={tmp_path}",
                        "--config.decode.method=beam"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "evaluate: error: Unknown command line flag 'config.decode.method'; --config.* "
        "overrides need --config=FILE before them"), r.stderr[-3000:]


@pytest.mark.parametrize("command, args", [
    ("train", ["--flagfile=missing.flags"]), ("evaluate", ["--flagfile=missing.flags"]),
    ("estimate", ["--flagfile", "missing.flags"]), ("infer", ["--flagfile=missing.flags"])])
def test_a_flagfile_that_cannot_be_read_is_one_line(tmp_path, command, args):
    """config_flags reads flagfiles when the modules define their config flags: a traceback."""
    r = subprocess.run([sys.executable, "-m", f"t5x_lite.{command}", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        f"{command}: error: Unable to open flagfile: [Errno 2] No such file or "
        "directory: 'missing.flags'"], r.stderr[-3000:]


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")),
                    reason="gs:// is reachable here (through gcsfs or tensorflow)")
def test_a_gs_workdir_without_gcsfs_is_one_line():
    """Fresh TPU workers had no gcsfs: fsspec's ImportError ended a 71-line traceback."""
    r = subprocess.run([sys.executable, "-m", "t5x_lite.train", "--config=configs/tiny_gpt.py",
                        "--workdir=gs://bucket/run"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert [line for line in r.stderr.splitlines() if not re.match(r"[IW]\d{4} ", line)] == [
        "train: error: gs:// paths need gcsfs: pip install gcsfs (or pip install -e '.[gcs]')"
    ], r.stderr[-3000:]


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")),
                    reason="gs:// is reachable here (through gcsfs or tensorflow)")
def test_gs_checkpoint_data_and_vocab_paths_without_gcsfs_are_one_line():
    """Where evaluate / infer / convert / lora take a checkpoint path, and where data and
    vocabulary paths enter: the same one line as a gs:// workdir."""
    with pytest.raises(errors.UserError, match=r"^gs:// paths need gcsfs: pip install gcsfs"):
        checkpoints.local_or_remote("gs://bucket/run")
    for key, value in (("vocab_path", "gs://bucket/v.model"), ("data_dir", "gs://bucket/tfds"),
                       ("paths", "a.txt,gs://bucket/b.txt")):
        with pytest.raises(DataConfigError, match=r"^Invalid data config: gs:// paths need "
                                                  r"gcsfs"):
            DataConfig(**{"source": "text", "paths": "a.txt", key: value})


def test_the_console_keeps_info_lines_of_the_package_only():
    """Not of any file whose path holds "t5x_lite": launch/tpu_vm.sh puts the venv in
    ~/t5x_lite/.venv, where every library's path does."""
    console = cli._Console()

    def shown(path):
        return console.filter(logging.LogRecord("absl", logging.INFO, path, 1, "m", None, None))
    package = os.path.dirname(cli.__file__)
    assert shown(os.path.join(package, "training", "trainer.py"))
    assert not shown("/home/me/t5x_lite/.venv/lib/python3.11/site-packages/orbax/manager.py")
    assert not shown("/opt/venv/lib/python3.11/site-packages/jax/_src/compiler.py")
