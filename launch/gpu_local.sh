#!/usr/bin/env bash
# Debug a pod config on one local GPU (or the CPU): same config, shrunk by flags.
#
#   launch/gpu_local.sh --config=configs/t5_1_1_base.py --workdir=/tmp/t5_debug
#   launch/gpu_local.sh --config=configs/gpt_1b.py --workdir=/tmp/gpt_debug --cpu --disable_jit \
#       -- --config.model.num_layers=2
#
# Sets XLA_PYTHON_CLIENT_PREALLOCATE=false (allocate GPU memory as needed, so memory use is
# visible and other processes fit), JAX_DEBUG_NANS (stop at the first op producing a NaN), and
# runs `python -m t5x_lite.train` with --config.train.debug=True, a tiny batch, a one-device
# mesh, logging every step and few steps. Anything after -- is passed on unchanged. Without
# --cpu it first checks that JAX sees a GPU: a jax without CUDA would fall back to the CPU.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_local.sh --config=FILE --workdir=DIR [options] [-- TRAIN_ARGS...]

Options:
  --config=FILE        run config, e.g. configs/t5_1_1_base.py (required)
  --workdir=DIR        run directory (required; re-running resumes)
  --batch_size=N       global batch (default 4)
  --steps=N            training steps (default 20)
  --seq_len=N          shrink sequence lengths: data.seq_len / inputs_length = N,
                       targets_length = max(N/4, 2) (default: the config's)
  --gpu=ID             which GPU, an index or a GPU-/MIG- UUID (CUDA_VISIBLE_DEVICES; default 0)
  --cpu                run on the CPU instead (JAX_PLATFORMS=cpu)
  --disable_jit        run op by op (JAX_DISABLE_JIT=1): slow, but Python breakpoints work
  --no_debug_nans      no NaN checks: no JAX_DEBUG_NANS, and --config.train.debug=False
                       (which would turn jax_debug_nans on in the trainer)
  --mem_fraction=F     cap this process's GPU memory at fraction F in (0, 1]
                       (XLA_CLIENT_MEM_FRACTION; the deprecated XLA_PYTHON_CLIENT_MEM_FRACTION,
                       which jax refuses beside it, is removed from the environment)
  --dry_run            print the command and environment instead of running
  -h, --help           this help
EOF
}

die() { echo "gpu_local.sh: $*" >&2; exit 2; }

config=""
workdir=""
batch_size=4
steps=20
seq_len=""
gpu=0
cpu=0
disable_jit=0
debug_nans=1
mem_fraction=""
dry_run=0
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --batch_size=*) batch_size="${1#*=}" ;;
    --steps=*) steps="${1#*=}" ;;
    --seq_len=*) seq_len="${1#*=}" ;;
    --gpu=*) gpu="${1#*=}" ;;
    --cpu) cpu=1 ;;
    --disable_jit) disable_jit=1 ;;
    --no_debug_nans) debug_nans=0 ;;
    --mem_fraction=*) mem_fraction="${1#*=}" ;;
    --dry_run|--dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (train arguments go after --; see --help)" ;;
  esac
  shift
done

[[ -n "$config" ]] || die "--config is required"
[[ -n "$workdir" ]] || die "--workdir is required"
for v in batch_size steps; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--$v must be a positive integer, got '${!v}'"
done
[[ -z "$seq_len" || ( "$seq_len" =~ ^[1-9][0-9]*$ && "$seq_len" -ge 2 ) ]] \
  || die "--seq_len must be an integer >= 2, got '$seq_len'"
[[ "$gpu" =~ ^([0-9]+|(GPU|MIG)-[0-9A-Za-z/-]+)$ ]] \
  || die "--gpu must be one GPU index or UUID (the mesh is one device), got '$gpu'"
if [[ -n "$mem_fraction" ]]; then
  [[ "$mem_fraction" =~ ^(0?\.[0-9]+|1(\.0*)?)$ && ! "$mem_fraction" =~ ^0?\.0+$ ]] \
    || die "--mem_fraction must be a number in (0, 1], got '$mem_fraction'"
fi

# env -u: a variable of the caller's that would contradict ours.
env_vars=(XLA_PYTHON_CLIENT_PREALLOCATE=false)
if (( cpu )); then
  env_vars+=(JAX_PLATFORMS=cpu)
else
  env_vars+=("CUDA_VISIBLE_DEVICES=$gpu")
fi
if (( debug_nans )); then env_vars+=(JAX_DEBUG_NANS=True); fi
if (( disable_jit )); then env_vars+=(JAX_DISABLE_JIT=1); fi
unset_vars=()
if [[ -n "$mem_fraction" ]]; then
  unset_vars+=(-u XLA_PYTHON_CLIENT_MEM_FRACTION)
  env_vars+=("XLA_CLIENT_MEM_FRACTION=$mem_fraction")
fi
# A caller's JAX_PLATFORMS=cpu would hide the GPU ("JAX sees no GPU").
(( cpu )) || unset_vars+=(-u JAX_PLATFORMS)
env_vars=("${unset_vars[@]}" "${env_vars[@]}")

# The pod config, shrunk: one device, tiny batch, every step logged, one checkpoint at the end.
# train.debug=True logs every step and turns jax_debug_nans on for the loop; --no_debug_nans
# must switch it off too, or the env var alone would change nothing.
args=(--config="$config" --workdir="$workdir"
      --config.train.debug="$( (( debug_nans )) && echo True || echo False)"
      --config.train.batch_size="$batch_size"
      --config.train.microbatches=1
      --config.train.num_steps="$steps"
      --config.train.log_every=1
      --config.train.eval_every=0
      --config.checkpoint.save_every="$steps"
      --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1)
if [[ -n "$seq_len" ]]; then
  targets=$(( seq_len / 4 >= 2 ? seq_len / 4 : 2 ))  # the data pipeline needs >= 2
  args+=(--config.data.seq_len="$seq_len" --config.data.inputs_length="$seq_len"
         --config.data.targets_length="$targets")
fi
args+=("${extra[@]}")

python="${PYTHON:-python3}"
if (( dry_run )); then
  line="env"
  for a in "${env_vars[@]}" "$python" -m t5x_lite.train "${args[@]}"; do
    line+=" $(printf '%q' "$a")"
  done
  echo "$line"
  exit 0
fi
if (( ! cpu )); then
  # A jax without CUDA support only warns and trains on the CPU: refuse instead.
  env "${env_vars[@]}" "$python" -c 'import sys, jax; sys.exit(jax.default_backend() != "gpu")' \
    >/dev/null 2>&1 || die "JAX sees no GPU (CUDA_VISIBLE_DEVICES=$gpu): install a CUDA-enabled \
jax (\"jax[cuda12]\" or \"jax[cuda13]\"), check nvidia-smi, or pass --cpu"
fi
exec env "${env_vars[@]}" "$python" -m t5x_lite.train "${args[@]}"
