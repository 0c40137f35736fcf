#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a pod slice), put this repo on every worker, install it,
# run `python -m t5x_lite.train` on all workers at once, follow the logs, stop, delete.
#
#   launch/tpu_vm.sh create  --name=t5 --zone=us-central2-b --accelerator_type=v4-32 [--spot]
#   launch/tpu_vm.sh setup   --name=t5 --zone=us-central2-b          # copy (or --repo clone) + pip install
#   launch/tpu_vm.sh train   --name=t5 --zone=us-central2-b -- --config=configs/t5_1_1_base.py \
#                            --workdir=gs://BUCKET/t5_base
#   launch/tpu_vm.sh logs | stop | delete | ssh   --name=t5 --zone=us-central2-b
#   launch/tpu_vm.sh up  ... -- TRAIN_ARGS        # create + setup + train
#
# --dry_run prints every command instead of running it. Run with --help for all options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh ACTION [options] [-- TRAIN_ARGS...]

Actions:
  create   gcloud compute tpus tpu-vm create (accelerator type, runtime version, spot/preemptible)
  setup    copy this checkout to every worker (or git clone --repo; a clone there already is
           moved to --repo's --branch), then `pip install -e '.[gcs]'` there into DIR/.venv
           (jax >= 0.10 needs Python >= 3.11; the TPU runtimes are Ubuntu 22.04 with Python
           3.10, so python3.11 comes from apt when python3 is older)
  train    start `.venv/bin/python -m t5x_lite.train TRAIN_ARGS` on all workers at once
           (--worker=all), in the background with a log file and pid file per worker
           (--foreground to stream); refuses while a run started by `train` is still going
  logs     follow the training log of one worker (--log_worker, default 0)
  stop     stop the training processes on all workers (by their pid files) and wait for them
           to save a checkpoint and exit
  delete   delete the TPU VM
  ssh      run --command=CMD on the workers (--worker, default all)
  up       create + setup + train

Options:
  --name=NAME               TPU VM name (required): lowercase letters, digits, hyphens
  --zone=ZONE               zone, e.g. us-central2-b (required)
  --project=PROJECT         gcloud project (default: gcloud's configured project)
  --accelerator_type=TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-64, v6e-8 (default v4-8)
  --version=VERSION         TPU runtime (default picked from the accelerator type)
  --spot | --preemptible    cheaper, may be preempted (re-running `train` resumes from the workdir)
  --repo=URL [--branch=B]   git clone on the workers instead of copying this checkout
  --remote_dir=DIR          code directory on the workers (default t5x_lite, relative to ~)
  --foreground              `train`: stream all workers' output instead of running in background
  --log_worker=N            `logs`: which worker to follow (default 0)
  --worker=W                `ssh`: worker index, comma-separated indices or 'all' (default all)
  --command=CMD             `ssh`: the command to run
  --dry_run                 print the commands instead of running them
  -h, --help                this help
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

action=""
name=""
zone=""
project=""
accelerator_type="v4-8"
version=""
capacity=""
repo=""
branch=""
remote_dir="t5x_lite"
foreground=0
log_worker=0
worker="all"
command_arg=""
dry_run=0
train_args=()

[[ $# -gt 0 ]] || { usage; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator_type=*|--accelerator-type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) capacity="--spot" ;;
    --preemptible) capacity="--preemptible" ;;
    --repo=*) repo="${1#*=}" ;;
    --branch=*) branch="${1#*=}" ;;
    --remote_dir=*) remote_dir="${1#*=}" ;;
    --foreground) foreground=1 ;;
    --log_worker=*) log_worker="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --command=*) command_arg="${1#*=}" ;;
    --dry_run|--dry-run) dry_run=1 ;;
    --) shift; train_args=("$@")
        for a in "${train_args[@]}"; do  # a misplaced --dry_run would run the real commands
          [[ "$a" != --dry_run && "$a" != --dry-run ]] || die "--dry_run goes before --, not among the train arguments"
        done
        break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$action" ]] || die "unexpected argument $1 (train arguments go after --)"
       action="$1" ;;
  esac
  shift
done

case "$action" in
  create|setup|train|logs|stop|delete|ssh|up) ;;
  "") die "no action given (see --help)" ;;
  *) die "unknown action '$action' (see --help)" ;;
esac
# Before anything runs: `up` without them created and set up a (billed) TPU first.
if [[ "$action" == train || "$action" == up ]] && (( ${#train_args[@]} == 0 )); then
  die "$action needs arguments after --, e.g. -- --config=configs/t5_small.py --workdir=gs://BUCKET/run"
fi
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
# Both end up unquoted in remote shell commands (and the name in file names there).
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name must be lowercase letters, digits and hyphens, starting with a letter, got '$name'"
[[ "$remote_dir" =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ ]] \
  || die "--remote_dir must be relative to ~ and made of letters, digits and . _ / -, got '$remote_dir'"
[[ "$log_worker" =~ ^[0-9]+$ ]] || die "--log_worker must be a worker index, got '$log_worker'"
[[ "$worker" =~ ^(all|[0-9]+(,[0-9]+)*)$ ]] \
  || die "--worker must be 'all' or worker indices like 0 or 0,2, got '$worker'"

if [[ -z "$version" ]]; then
  case "$accelerator_type" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "no default --version for accelerator type '$accelerator_type'; pass --version" ;;
  esac
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log_file="\$HOME/${name}_train.log"
pid_file="\$HOME/${name}_train.pid"
python=".venv/bin/python"  # the workers' venv, relative to ~/$remote_dir (see do_setup)

# Prints a command the way a shell would read it back: plain words bare, others single-quoted.
show() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$arg "
    elif [[ "$arg" =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
      out+="${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}' "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

run() {
  if (( dry_run )); then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
location=(--zone="$zone")
[[ -z "$project" ]] || location+=(--project="$project")

# ssh WORKER COMMAND: run COMMAND on one worker or on all of them at once.
tpu_ssh() {
  run "${gcloud_tpu[@]}" ssh "$name" --worker="$1" --command="$2" "${location[@]}"
}

quote_args() {
  local out="" arg
  for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
  echo "${out% }"
}

do_create() {
  local cmd=("${gcloud_tpu[@]}" create "$name" "${location[0]}" --accelerator-type="$accelerator_type"
             --version="$version")
  [[ -z "$project" ]] || cmd+=("${location[1]}")
  [[ -z "$capacity" ]] || cmd+=("$capacity")
  run "${cmd[@]}"
}

do_setup() {
  if [[ -n "$repo" ]]; then
    local clone="git clone --depth=1" url ref git="git -C ~/$remote_dir"
    [[ -z "$branch" ]] || clone+=" --branch=$(printf '%q' "$branch")"
    url="$(printf '%q' "$repo")" ref="$(printf '%q' "${branch:-HEAD}")"
    # A clone there already (an earlier setup) is moved to --repo's --branch (default: its
    # HEAD); git refuses, and so does setup, where that would overwrite local changes.
    tpu_ssh all "if [ -d ~/$remote_dir/.git ]; then $git fetch -q --depth=1 $url $ref && $git checkout -q --detach FETCH_HEAD; else $clone $url ~/$remote_dir; fi"
  else
    # Copy the working tree (not .git or build outputs) as one tarball to every worker.
    local tarball="/tmp/${name}_t5x_lite.tar.gz"
    run tar -czf "$tarball" -C "$repo_root" --exclude=.git --exclude=.venv --exclude=venv \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .
    run "${gcloud_tpu[@]}" scp "$tarball" "$name:t5x_lite.tar.gz" --worker=all "${location[@]}"
    tpu_ssh all "mkdir -p ~/$remote_dir && tar -xzf ~/t5x_lite.tar.gz -C ~/$remote_dir"
  fi
  # jax >= 0.10 needs Python >= 3.11 and the TPU runtimes ship Ubuntu 22.04's Python 3.10, so
  # the venv is made from apt's python3.11 when python3 is older. DPkg::Lock::Timeout: a fresh
  # VM's unattended-upgrades may hold the dpkg lock for a few minutes.
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600"
  local venv="if [ ! -x $python ]; then py=python3; "
  venv+="python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' "
  venv+="|| { $apt update && $apt -y install python3.11 python3.11-venv && py=python3.11 || exit 1; }; "
  venv+="\$py -m venv .venv || exit 1; fi"
  # The README's install line (`pip install -e .`) plus libtpu, resolved together so jax matches,
  # and gcsfs (extra `gcs`) for gs:// workdirs and data.
  tpu_ssh all "cd ~/$remote_dir && $venv && $python -m pip install -q -U pip && $python -m pip install -q -e \".[gcs]\" \"jax[tpu]>=0.10\""
}

do_train() {
  # T5X_LITE_DISTRIBUTED=on: every worker calls jax.distributed.initialize(), which finds the
  # other workers of the slice from the TPU metadata server.
  local train env="T5X_LITE_DISTRIBUTED=on"
  train="$python -m t5x_lite.train $(quote_args "${train_args[@]}")"
  # A second trainer would find the TPU busy and overwrite the pid file `stop` needs.
  local idle="if [ -f $pid_file ] && kill -0 -- -\$(cat $pid_file) 2>/dev/null; then echo \"a run is still going on \$(hostname) ($pid_file): stop it first\" >&2; exit 1; fi"
  if (( foreground )); then
    tpu_ssh all "cd ~/$remote_dir && $idle && $env $train"
  else
    # setsid: the run survives the ssh session and `stop` can signal its whole process group.
    tpu_ssh all "cd ~/$remote_dir && $idle && ($env setsid nohup $train > $log_file 2>&1 < /dev/null & echo \$! > $pid_file) && echo started on \$(hostname), log $log_file"
  fi
}

do_stop() {
  # SIGTERM makes the trainer save a checkpoint and exit: the pid file goes only with the whole
  # process group, so that `train` refuses until then (its host lock would stop a new run).
  local wait_s=900 group="-\$(cat $pid_file)"
  local wait="echo \"stopping on \$(hostname): waiting for the run to save a checkpoint and exit\"; i=0; while kill -0 -- $group 2>/dev/null; do if [ \$i -ge $wait_s ]; then echo \"the run on \$(hostname) is still going after ${wait_s} s: stop again, or kill -9 -- $group\" >&2; exit 1; fi; sleep 1; i=\$((i + 1)); done; echo stopped on \$(hostname)"
  tpu_ssh all "if [ -f $pid_file ] && kill -- $group 2>/dev/null; then $wait; else echo no training process on \$(hostname); fi; rm -f $pid_file"
}

case "$action" in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  up) do_create; do_setup; do_train ;;
  logs) tpu_ssh "$log_worker" "tail -n 200 -F $log_file" ;;
  stop) do_stop ;;
  delete) run "${gcloud_tpu[@]}" delete "$name" "${location[@]}" --quiet ;;
  ssh) [[ -n "$command_arg" ]] || die "ssh needs --command=CMD"
       tpu_ssh "$worker" "$command_arg" ;;
esac
