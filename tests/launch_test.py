"""Launch scripts: shellcheck, the TPU VM pod dry run, local GPU / CPU command lines, and one
real debug run through launch/gpu_local.sh on the CPU."""
import importlib.util
import os
import pathlib
import shlex
import shutil
import signal
import stat
import subprocess
import time

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
    # the README's install line, with gcsfs for gs:// paths
    assert any('pip install -q -e ".[gcs]"' in c for c in commands)
    train = commands[-1]
    assert "T5X_LITE_DISTRIBUTED=on" in train and ".venv/bin/python -m t5x_lite.train" in train
    # Train arguments survive two rounds of shell quoting (ours, then the remote shell's).
    inner = shlex.split(train[train.index(".venv/bin/python"):train.index(" > ")])
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
                           "--dry_run goes before --"),
                          # the name lands unquoted in remote commands and file names
                          (["create", "--name=t5 pod", "--zone=z", "--dry_run"],
                           "--name must be lowercase letters"),
                          (["stop", "--name=p;rm", "--zone=z", "--dry_run"],
                           "--name must be lowercase letters"),
                          (["setup", *base, "--remote_dir=a;b"], "--remote_dir must be"),
                          (["logs", *base, "--log_worker=w0"], "--log_worker must be"),
                          (["ssh", *base, "--worker=1 2", "--command=ls"], "--worker must be")]:
        r = run("tpu_vm.sh", *args, check=False)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    # `up` without train arguments refuses before it creates (and bills) anything
    r = run("tpu_vm.sh", "up", *base, check=False)
    assert r.returncode == 2 and "up needs arguments after --" in r.stderr, r.stderr
    assert "gcloud" not in r.stdout, r.stdout


def _remote_command(*args, which=-1):
    """The --command of the last (or `which`) `gcloud ... tpu-vm ssh` line tpu_vm.sh prints for
    `args`."""
    action, *rest = args
    lines = run("tpu_vm.sh", action, "--name=p", "--zone=z", "--dry_run", *rest
                ).stdout.splitlines()
    argv = shlex.split([line for line in lines if " tpu-vm ssh " in line][which])
    return next(a for a in argv if a.startswith("--command="))[len("--command="):]


def _fake(path: pathlib.Path, body: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("python3_version_ok", [False, True])
def test_tpu_vm_setup_installs_into_a_python_3_11_venv(tmp_path, python3_version_ok):
    """The remote install command, run here against fake python3 / python3.11 / sudo: jax >= 0.10
    needs Python >= 3.11, and the TPU runtimes' python3 is 3.10."""
    home, calls = tmp_path / "home", tmp_path / "calls"
    (home / "t5x_lite").mkdir(parents=True)
    venv_python = ('_fake() { echo "$0 $*" >> %s; }; _fake "$@"' % calls)
    make_venv = (f'if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin"; '
                 f'printf "%s\\n" "#!/usr/bin/env bash" {shlex.quote(venv_python)} '
                 f'> "$3/bin/python"; chmod +x "$3/bin/python"; fi\n')
    _fake(tmp_path / "bin" / "python3",
          f'echo "python3 $*" >> {calls}\n'
          f'[[ "$1" == -c ]] && exit {0 if python3_version_ok else 1}\n' + make_venv)
    _fake(tmp_path / "bin" / "python3.11", f'echo "python3.11 $*" >> {calls}\n' + make_venv)
    _fake(tmp_path / "bin" / "sudo", f'echo "sudo $*" >> {calls}\n')
    env = {**os.environ, "HOME": str(home), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", _remote_command("setup")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    log = calls.read_text().splitlines()
    py = "python3" if python3_version_ok else "python3.11"
    assert f"{py} -m venv .venv" in log
    apt = [line for line in log if line.startswith("sudo ")]
    if python3_version_ok:
        assert not apt
    else:
        assert apt and apt[-1].endswith("install python3.11 python3.11-venv")
    assert log[-1] == '.venv/bin/python -m pip install -q -e .[gcs] jax[tpu]>=0.10'


def test_tpu_vm_setup_moves_an_existing_clone_to_the_repo_and_branch_asked_for(tmp_path):
    """A second `setup --repo --branch` used to `git pull` whatever the workers had."""
    git = lambda *args, cwd=tmp_path: subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
        capture_output=True, text=True)
    src, other, home = tmp_path / "src", tmp_path / "other", tmp_path / "home"
    for repo, branches in [(src, ["b1", "b2"]), (other, ["main"])]:
        git("init", "-q", "-b", branches[0], str(repo))
        for b in branches:
            if b != branches[0]:
                git("checkout", "-q", "-b", b, cwd=repo)
            (repo / "f").write_text(f"{repo.name} {b}\n")
            git("add", "f", cwd=repo)
            git("commit", "-qm", b, cwd=repo)
    git("checkout", "-q", "b1", cwd=src)  # src's HEAD: b1
    env = {**os.environ, "HOME": str(home)}
    clone = home / "t5x_lite" / "f"
    for repo, branch, want in [(src, "b2", "src b2"), (src, "b1", "src b1"),
                               (src, "b2", "src b2"), (src, None, "src b1"),
                               (other, "main", "other main")]:
        command = _remote_command("setup", f"--repo=file://{repo}",
                                  *([f"--branch={branch}"] if branch else []), which=0)
        r = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and clone.read_text() == f"{want}\n", (branch, r.stderr)
    clone.write_text("edited on the worker\n")  # refused, not overwritten
    command = _remote_command("setup", f"--repo=file://{src}", "--branch=b1", which=0)
    r = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "local changes" in r.stderr, r.stderr
    assert clone.read_text() == "edited on the worker\n"


def test_tpu_vm_train_refuses_a_second_run_and_stop_ends_it(tmp_path):
    """The remote train / stop commands, run here with a fake venv python that sleeps and,
    like the trainer saving its checkpoint, takes a while to exit on SIGTERM."""
    home = tmp_path / "home"
    argv_file = tmp_path / "argv"
    _fake(home / "t5x_lite" / ".venv" / "bin" / "python",
          f'printf "%s\\n" "$@" > {argv_file}\ntrap "sleep 2; exit 0" TERM\n'
          'sleep 300 & wait $!\n')
    env = {**os.environ, "HOME": str(home)}
    remote = lambda *args: subprocess.run(["bash", "-c", _remote_command(*args)], env=env,
                                          capture_output=True, text=True, timeout=60)
    train = ("train", "--", "--config=configs/t5_small.py", "--workdir=/tmp/a b")
    pid_file = home / "p_train.pid"
    first = remote(*train)
    try:
        assert first.returncode == 0 and "started on" in first.stdout, first.stderr
        for _ in range(600):  # the background process writes its argv
            if argv_file.exists() and argv_file.read_text().count("\n") >= 4:
                break
            time.sleep(0.05)
        assert argv_file.read_text().splitlines() == [
            "-m", "t5x_lite.train", "--config=configs/t5_small.py", "--workdir=/tmp/a b"]
        pgid = int(pid_file.read_text())
        second = remote(*train)
        assert second.returncode == 1 and "a run is still going" in second.stderr
        assert int(pid_file.read_text()) == pgid  # `stop` can still find the first run
        stop = remote("stop")
        assert stop.returncode == 0 and "stopped on" in stop.stdout, stop.stderr
        assert not pid_file.exists()
        with pytest.raises(ProcessLookupError):  # `stop` waited for the run to end
            os.killpg(pgid, 0)
        again = remote("stop")
        assert again.returncode == 0 and "no training process" in again.stdout
    finally:
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_cpu_local_dry_run_sets_one_job_of_n_processes():
    r = run("cpu_local.sh", "--num_processes=3", "--devices_per_process=2", "--port=4321",
            "--dry_run", "--", "--config=configs/tiny_t5.py", "--workdir=/tmp/a b",
            env={"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"})
    lines = [shlex.split(line) for line in r.stdout.strip().splitlines()]
    assert len(lines) == 3
    for i, argv in enumerate(lines):
        env = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
        assert env["T5X_LITE_PROCESS_ID"] == str(i) and env["T5X_LITE_NUM_PROCESSES"] == "3"
        assert env["T5X_LITE_COORDINATOR"] == "127.0.0.1:4321"
        # The caller's other flags are kept; its device count is replaced.
        assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"
        assert argv[-4:] == ["-m", "t5x_lite.train", "--config=configs/tiny_t5.py",
                             "--workdir=/tmp/a b"]
    r = run("cpu_local.sh", "--num_processes=0", check=False)
    assert r.returncode == 2 and "at least 1" in r.stderr


def test_cpu_local_keeps_the_callers_xla_flags_and_checks_its_numbers():
    r = run("cpu_local.sh", "--devices_per_process=2", "--port=4321", "--dry_run",
            env={"XLA_FLAGS": "--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=8"})
    for line in r.stdout.strip().splitlines():
        env = dict(a.split("=", 1) for a in shlex.split(line) if a.isupper() or "=" in a
                   and not a.startswith("-"))
        assert env["XLA_FLAGS"] == ("--xla_dump_to=/tmp/dump "
                                    "--xla_force_host_platform_device_count=2")
    for args, message in [(["--port=0"], "--port must be an integer in 1-65535"),
                          (["--port=http"], "--port must be an integer in 1-65535"),
                          (["--heartbeat_timeout=0"], "--heartbeat_timeout must be at least 1"),
                          (["--init_timeout=0"], "--init_timeout must be at least 1")]:
        r = run("cpu_local.sh", *args, "--dry_run", check=False)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_cpu_local_reads_numbers_with_leading_zeros_as_decimal(tmp_path):
    """bash arithmetic reads 010 as 8 (8 processes told there were 10: a hang) and 08 as an
    error; --timeout=09 failed every poll and was never enforced."""
    for given, n in [("010", 10), ("08", 8)]:
        r = run("cpu_local.sh", f"--num_processes={given}", "--port=08080", "--dry_run")
        lines = [shlex.split(line) for line in r.stdout.strip().splitlines()]
        assert len(lines) == n and not r.stderr, r.stderr
        for argv in lines:
            assert f"T5X_LITE_NUM_PROCESSES={n}" in argv
            assert "T5X_LITE_COORDINATOR=127.0.0.1:8080" in argv
    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(40)\n")
    r = run("cpu_local.sh", "--num_processes=1", "--module=sleeper", "--timeout=08",
            env={"PYTHONPATH": str(tmp_path)}, check=False)
    assert r.returncode == 124 and r.stderr.strip().splitlines() == [
        "cpu_local.sh: timed out after 8s; stopping all processes"], r.stderr[-3000:]


def test_cpu_local_gives_a_stopped_process_time_to_save(tmp_path):
    """A timeout (or Ctrl-C / SIGTERM) sends SIGTERM, on which a trainer saves a checkpoint,
    and SIGKILL only after a grace period: it came 2 s later, cutting a longer save off."""
    (tmp_path / "saver.py").write_text(
        "import os, signal, sys, time\n"
        "def save(*_):\n"
        "    time.sleep(3)  # a checkpoint save\n"
        "    open(os.path.join(os.environ['OUT'], 'saved'), 'w').close()\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, save)\n"
        "time.sleep(60)\n")
    r = run("cpu_local.sh", "--num_processes=1", "--module=saver", "--timeout=2",
            env={"PYTHONPATH": str(tmp_path), "OUT": str(tmp_path)}, check=False)
    assert r.returncode == 124 and (tmp_path / "saved").exists(), r.stderr[-3000:]


def test_gpu_local_dry_run_shrinks_the_pod_config():
    r = run("gpu_local.sh", "--config=configs/gpt_1b.py", "--workdir=/tmp/g", "--batch_size=2",
            "--steps=5", "--seq_len=64", "--disable_jit", "--dry_run", "--",
            "--config.model.num_layers=2")
    argv = shlex.split(r.stdout)
    assert argv[0] == "env" and "XLA_PYTHON_CLIENT_PREALLOCATE=false" in argv
    assert "JAX_DEBUG_NANS=True" in argv and "JAX_DISABLE_JIT=1" in argv
    assert "CUDA_VISIBLE_DEVICES=0" in argv
    assert argv[argv.index("-u") + 1] == "JAX_PLATFORMS"  # a caller's =cpu hid the GPU
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


def test_gpu_local_no_debug_nans_and_mem_fraction_take_effect():
    argv = shlex.split(run("gpu_local.sh", "--config=c.py", "--workdir=w", "--no_debug_nans",
                           "--mem_fraction=0.5", "--seq_len=4", "--dry_run").stdout)
    # train.debug=True would turn jax_debug_nans on in the trainer whatever the environment.
    assert "--config.train.debug=False" in argv and "--config.train.debug=True" not in argv
    assert not any(a.startswith("JAX_DEBUG_NANS") for a in argv)
    # jax 0.10 reads XLA_CLIENT_MEM_FRACTION and refuses the deprecated name beside it.
    assert "XLA_CLIENT_MEM_FRACTION=0.5" in argv
    assert argv[argv.index("-u") + 1] == "XLA_PYTHON_CLIENT_MEM_FRACTION"
    assert "--config.data.targets_length=2" in argv  # N/4 = 1 would be refused by the data
    for args, message in [(["--mem_fraction=0"], "--mem_fraction must be a number in (0, 1]"),
                          (["--mem_fraction=75"], "--mem_fraction must be a number in (0, 1]"),
                          (["--gpu=0,1"], "--gpu must be one GPU index or UUID"),
                          (["--gpu=0 1"], "--gpu must be one GPU index or UUID"),
                          (["--seq_len=1"], "--seq_len must be an integer >= 2")]:
        r = run("gpu_local.sh", "--config=c.py", "--workdir=w", *args, "--dry_run", check=False)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_gpu_local_refuses_to_train_on_the_cpu_when_it_sees_no_gpu(tmp_path):
    """A jax without CUDA (or no such GPU) only warns and falls back to the CPU."""
    workdir = tmp_path / "w"
    r = run("gpu_local.sh", "--config=configs/tiny_gpt.py", f"--workdir={workdir}", "--gpu=97",
            "--steps=1", "--batch_size=1", "--seq_len=16", check=False)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("gpu_local.sh: JAX sees no GPU")
    assert not workdir.exists()


@pytest.mark.skipif(not os.environ.get("T5X_LITE_SLOW_TESTS"),
                    reason="a real training run (~40 s); set T5X_LITE_SLOW_TESTS=1")
def test_gpu_local_debug_run_on_cpu(tmp_path):
    """The script's command line really runs: 2 debug steps of tiny_gpt on the CPU."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = run("gpu_local.sh", "--config=configs/tiny_gpt.py", f"--workdir={tmp_path / 'w'}",
            "--cpu", "--steps=2", "--batch_size=2", "--seq_len=32", env=env)
    log = r.stdout + r.stderr
    assert "step 1/2" in log and "step 2/2" in log, log[-3000:]
