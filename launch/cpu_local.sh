#!/usr/bin/env bash
# Run N processes of the same command on this machine as one multi-host JAX job: CPU devices,
# gloo collectives over loopback. This is how multi-host code paths are tested without a pod.
#
#   launch/cpu_local.sh --num_processes=2 --devices_per_process=4 -- \
#       --config=configs/tiny_t5.py --workdir=/tmp/tiny_t5_mp --config.train.num_steps=20
#
# Every process gets JAX_PLATFORMS=cpu, --xla_force_host_platform_device_count=M added to the
# caller's XLA_FLAGS (any other device count there is dropped) and
# T5X_LITE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, which t5x_lite.distributed.maybe_initialize()
# turns into jax.distributed.initialize(...). If one process fails, the others are stopped and
# the script exits with the failed process's status.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/cpu_local.sh [options] [-- ARGS...]

Starts N local processes of `python -m MODULE ARGS` (MODULE defaults to t5x_lite.train).

Options:
  --num_processes=N        processes (default 2)
  --devices_per_process=M  fake CPU devices per process (default 4)
  --module=MODULE          python module to run (default t5x_lite.train)
  --port=PORT              coordinator port on 127.0.0.1, 1-65535 (default: a free port)
  --log_dir=DIR            write process_<i>.log there instead of prefixing lines on stdout
  --heartbeat_timeout=S    seconds before a silent process is declared dead (default 10)
  --init_timeout=S         seconds to wait for all processes to join (default 60)
  --timeout=S              stop everything after S seconds, exit 124 (default 0 = no limit):
                           SIGTERM (a trainer saves a checkpoint), SIGKILL 30 s later
  --dry_run                print the commands instead of running them
  -h, --help               this help
EOF
}

die() { echo "cpu_local.sh: $*" >&2; exit 2; }

num_processes=2
devices_per_process=4
module="t5x_lite.train"
port=""
log_dir=""
heartbeat_timeout=10
init_timeout=60
timeout_s=0
dry_run=0
args=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --heartbeat_timeout=*) heartbeat_timeout="${1#*=}" ;;
    --init_timeout=*) init_timeout="${1#*=}" ;;
    --timeout=*) timeout_s="${1#*=}" ;;
    --dry_run|--dry-run) dry_run=1 ;;
    --) shift; args=("$@"); break ;;
    *) die "unknown option $1 (arguments for the module go after --; see --help)" ;;
  esac
  shift
done

# 10#: bash arithmetic reads a leading 0 as octal (010 is 8, 08 an error).
for v in num_processes devices_per_process heartbeat_timeout init_timeout timeout_s; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--${v%_s} must be a non-negative integer, got '${!v}'"
  printf -v "$v" '%d' "$((10#${!v}))"
done
(( num_processes >= 1 )) || die "--num_processes must be at least 1"
(( devices_per_process >= 1 )) || die "--devices_per_process must be at least 1"
(( heartbeat_timeout >= 1 )) || die "--heartbeat_timeout must be at least 1"
(( init_timeout >= 1 )) || die "--init_timeout must be at least 1"
if [[ -n "$port" ]]; then
  if [[ ! "$port" =~ ^[0-9]{1,5}$ ]] || (( 10#$port < 1 || 10#$port > 65535 )); then
    die "--port must be an integer in 1-65535, got '$port'"
  fi
  port=$((10#$port))
fi
python="${PYTHON:-python3}"

if [[ -z "$port" ]]; then
  if (( dry_run )); then
    port=PORT
  else
    port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi

# The caller's XLA_FLAGS (dump options, ...) are kept; only the device count is ours.
read -ra user_xla_flags <<< "${XLA_FLAGS:-}"
xla_flags=""
for f in "${user_xla_flags[@]}"; do
  [[ "$f" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$f "
done
xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"

# env_for I: sets proc_env to process I's NAME=VALUE words.
env_for() {
  proc_env=("JAX_PLATFORMS=cpu"
            "XLA_FLAGS=$xla_flags"
            "T5X_LITE_COORDINATOR=127.0.0.1:$port"
            "T5X_LITE_NUM_PROCESSES=$num_processes"
            "T5X_LITE_PROCESS_ID=$1"
            "T5X_LITE_HEARTBEAT_TIMEOUT=$heartbeat_timeout"
            "T5X_LITE_INIT_TIMEOUT=$init_timeout")
}

if (( dry_run )); then
  for ((i = 0; i < num_processes; i++)); do
    env_for "$i"
    line=""
    for a in "${proc_env[@]}" "$python" -m "$module" "${args[@]}"; do
      line+="$(printf '%q' "$a") "
    done
    echo "${line% }"
  done
  exit 0
fi

[[ -z "$log_dir" ]] || mkdir -p "$log_dir"
pids=()

# SIGTERM, then SIGKILL to those still running after $1 seconds (a trainer saves a checkpoint
# on SIGTERM: a stop asked for, or a timeout, gives it 30 s; after a process failed, the others
# wait on collectives that cannot finish, and get 2 s).
stop_all() {
  local pid grace=$1 waited=0 alive
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  while (( waited < grace * 5 )); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.2
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all 30; exit 130' INT
trap 'stop_all 30; exit 143' TERM

for ((i = 0; i < num_processes; i++)); do
  env_for "$i"
  if [[ -n "$log_dir" ]]; then
    env "${proc_env[@]}" PYTHONUNBUFFERED=1 "$python" -m "$module" "${args[@]}" \
      > "$log_dir/process_$i.log" 2>&1 &
  else
    env "${proc_env[@]}" PYTHONUNBUFFERED=1 "$python" -m "$module" "${args[@]}" \
      > >(sed -u "s/^/[$i] /") 2>&1 &
  fi
  pids+=("$!")
done

# Poll instead of `wait -n`, which needs bash >= 5.1 to say which process ended.
start=$SECONDS
remaining=$num_processes
status=0
declare -A done_pids=()
while (( remaining > 0 )); do
  for ((i = 0; i < num_processes; i++)); do
    pid="${pids[$i]}"
    [[ -z "${done_pids[$pid]:-}" ]] || continue
    if ! kill -0 "$pid" 2>/dev/null; then
      code=0
      wait "$pid" || code=$?
      done_pids[$pid]=1
      remaining=$((remaining - 1))
      if (( code != 0 )); then
        echo "cpu_local.sh: process $i exited with status $code; stopping the other processes" >&2
        status=$code
        stop_all 2
        wait || true
        exit "$status"
      fi
    fi
  done
  if (( timeout_s > 0 && SECONDS - start >= timeout_s )); then
    echo "cpu_local.sh: timed out after ${timeout_s}s; stopping all processes" >&2
    stop_all 30
    wait || true
    exit 124
  fi
  (( remaining == 0 )) || sleep 0.2
done
wait || true
exit "$status"
