"""Launch scripts: shellcheck, the TPU VM pod dry run, local GPU / CPU command lines, and one
real debug run through launch/gpu_local.sh on the CPU."""
import importlib.util
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))


def load_config(name):
    spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run(script, *args, check=True, env=None):
    r = subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=None if env is None else {**os.environ, **env})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_all_three_launchers_exist_and_are_executable():
    assert {p.name for p in SCRIPTS} >= {"tpu_vm.sh", "gpu_local.sh", "cpu_local.sh"}
    for p in SCRIPTS:
        assert os.access(p, os.X_OK), p
        text = p.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
        assert run(p.name, "--help").stdout.startswith("Usage:")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script):
    r = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def test_tpu_vm_dry_run_for_a_v4_32_pod():
    r = run("tpu_vm.sh", "up", "--name=t5-pod", "--zone=us-central2-b", "--project=my-proj",
            "--accelerator_type=v4-32", "--spot", "--dry_run", "--",
            "--config=configs/t5_1_1_base.py", "--workdir=gs://bucket/t5 base")
    lines = r.stdout.strip().splitlines()
    assert lines[0] == ("gcloud compute tpus tpu-vm create t5-pod --zone=us-central2-b "
                        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base "
                        "--project=my-proj --spot")
    ssh = [shlex.split(line) for line in lines if " tpu-vm ssh " in line]
    assert ssh, lines
    for argv in ssh:  # each is one gcloud call on all workers of the slice at once
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t5-pod"]
        assert argv[6] == "--worker=all" and argv[7].startswith("--command=")
        assert argv[8:] == ["--zone=us-central2-b", "--project=my-proj"]
    commands = [argv[7][len("--command="):] for argv in ssh]
    assert any("pip install -q -e ." in c for c in commands)  # the README's install line
    train = commands[-1]
    assert "T5X_LITE_DISTRIBUTED=on" in train and "python3 -m t5x_lite.train" in train
    # Train arguments survive two rounds of shell quoting (ours, then the remote shell's).
    inner = shlex.split(train[train.index("python3"):train.index(" > ")])
    assert inner[3:] == ["--config=configs/t5_1_1_base.py", "--workdir=gs://bucket/t5 base"]
    assert any(" tpu-vm scp " in line and "--worker=all" in line for line in lines)


def test_tpu_vm_other_actions_and_errors():
    base = ["--name=p", "--zone=z", "--dry_run"]
    assert run("tpu_vm.sh", "delete", *base).stdout.strip() == (
        "gcloud compute tpus tpu-vm delete p --zone=z --quiet")
    logs = shlex.split(run("tpu_vm.sh", "logs", *base, "--log_worker=3").stdout)
    assert "--worker=3" in logs and "tail" in logs[7]
    stop = run("tpu_vm.sh", "stop", *base).stdout
    assert "--worker=all" in stop and "kill" in stop
    clone = run("tpu_vm.sh", "setup", *base, "--repo=https://github.com/x/y.git",
                "--branch=dev").stdout
    assert "git clone --depth=1 --branch=dev https://github.com/x/y.git" in clone
    assert "v2-alpha-tpuv5-lite" in run("tpu_vm.sh", "create", *base,
                                         "--accelerator_type=v5litepod-16").stdout
    for args, message in [(["train", *base], "train needs arguments after --"),
                          (["create", "--zone=z"], "--name is required"),
                          (["launch", *base], "unknown action"),
                          (["create", *base, "--accelerator_type=v9-8"], "no default --version"),
                          (["train", "--name=p", "--zone=z", "--", "--config=c.py", "--dry_run"],
                           "--dry_run goes before --")]:
        r = run("tpu_vm.sh", *args, check=False)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_cpu_local_dry_run_sets_one_job_of_n_processes():
    r = run("cpu_local.sh", "--num_processes=3", "--devices_per_process=2", "--port=4321",
            "--dry_run", "--", "--config=configs/tiny_t5.py", "--workdir=/tmp/a b")
    lines = [shlex.split(line) for line in r.stdout.strip().splitlines()]
    assert len(lines) == 3
    for i, argv in enumerate(lines):
        env = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
        assert env["T5X_LITE_PROCESS_ID"] == str(i) and env["T5X_LITE_NUM_PROCESSES"] == "3"
        assert env["T5X_LITE_COORDINATOR"] == "127.0.0.1:4321"
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
        assert argv[-4:] == ["-m", "t5x_lite.train", "--config=configs/tiny_t5.py",
                             "--workdir=/tmp/a b"]
    r = run("cpu_local.sh", "--num_processes=0", check=False)
    assert r.returncode == 2 and "at least 1" in r.stderr


def test_gpu_local_dry_run_shrinks_the_pod_config():
    r = run("gpu_local.sh", "--config=configs/gpt_1b.py", "--workdir=/tmp/g", "--batch_size=2",
            "--steps=5", "--seq_len=64", "--disable_jit", "--dry_run", "--",
            "--config.model.num_layers=2")
    argv = shlex.split(r.stdout)
    assert argv[0] == "env" and "XLA_PYTHON_CLIENT_PREALLOCATE=false" in argv
    assert "JAX_DEBUG_NANS=True" in argv and "JAX_DISABLE_JIT=1" in argv
    assert "CUDA_VISIBLE_DEVICES=0" in argv
    for flag in ("--config.train.debug=True", "--config.train.batch_size=2",
                 "--config.train.num_steps=5", "--config.train.log_every=1",
                 "--config.mesh.fsdp=1", "--config.data.seq_len=64",
                 "--config.data.targets_length=16", "--config.model.num_layers=2"):
        assert flag in argv, flag
    assert argv[-1] == "--config.model.num_layers=2"  # user flags last: they win
    # Every override names a real config key (a typo would make the trainer reject the run).
    config = load_config("gpt_1b")
    for a in argv:
        if a.startswith("--config."):
            section, key = a[len("--config."):].split("=")[0].split(".")
            assert key in config[section], a
    assert "JAX_PLATFORMS=cpu" in shlex.split(run("gpu_local.sh", "--config=c.py",
                                                  "--workdir=w", "--cpu", "--dry_run").stdout)


@pytest.mark.skipif(not os.environ.get("T5X_LITE_SLOW_TESTS"),
                    reason="a real training run (~40 s); set T5X_LITE_SLOW_TESTS=1")
def test_gpu_local_debug_run_on_cpu(tmp_path):
    """The script's command line really runs: 2 debug steps of tiny_gpt on the CPU."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = run("gpu_local.sh", "--config=configs/tiny_gpt.py", f"--workdir={tmp_path / 'w'}",
            "--cpu", "--steps=2", "--batch_size=2", "--seq_len=32", env=env)
    log = r.stdout + r.stderr
    assert "step 1/2" in log and "step 2/2" in log, log[-3000:]
