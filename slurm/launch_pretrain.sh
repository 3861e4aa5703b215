#!/bin/bash
# Shared launcher of slurm/pretrain_d{1..6}_{200m,500m,800m,1b}.sh: one `ccmega pretrain` task per GPU
# through srun. The per-model scripts set RECIPE (D1..D6) and SIZE (200m, 500m, 800m, 1b) and hold the
# #SBATCH defaults; everything else is an environment variable (see slurm/README.md):
#
#   PRESET          model preset                      (qwen3-$SIZE; qwen3-tiny with CCMEGA_CPU=1)
#   DATA_ROOT       output folder of `ccmega preprocess`; data = $DATA_ROOT/$RECIPE/pretrain.{bin,idx}
#   DATA_PREFIX     full data prefix(es), comma-separated (instead of DATA_ROOT/RECIPE)
#   TOKENIZER       tokenizer file/folder             (Qwen3's by default)
#   OUTPUT_ROOT     runs land in $OUTPUT_ROOT/pretrain_<recipe>_<size>   (RUN_DIR overrides the whole path)
#   NODES, GPUS_PER_NODE   srun layout inside the allocation (default: the allocation's)
#   STEPS, TP, PP, SEQ_LENGTH, GLOBAL_BATCH_SIZE, MICRO_BATCH_SIZE, SAVE_INTERVAL, EVAL_INTERVAL
#   FP8             hybrid (default on GPU), e4m3, or "off";  FP8_RECIPE (tensorwise), FP8_BF16_LAYERS (1)
#   CCMEGA_CPU=1    CPU cluster: no GPUs visible, gloo, fp32, no FP8, tiny preset and short sequences
#   EXTRA_ARGS      appended to the ccmega command line, e.g. "--set optim.max_lr=1e-3"
#   PYTHON          interpreter (python)
#
# Preemption / time limit: SLURM sends USR1 to this shell 300 s before the end (#SBATCH
# --signal=B:USR1@300) or TERM on preemption; the shell forwards it to the tasks, which save a
# checkpoint at the next step boundary and exit 0 with RUN_DIR/status.json saying "interrupted";
# the shell then requeues the job (`scontrol requeue`), and the requeued job resumes from `latest`.
set -uo pipefail

: "${RECIPE:?set RECIPE (D1..D6)}" "${SIZE:?set SIZE (200m, 500m, 800m, 1b)}"
REPO=${CCMEGA_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-python}
recipe_lc=$(echo "$RECIPE" | tr '[:upper:]' '[:lower:]')

if [ "${CCMEGA_CPU:-0}" = "1" ]; then
    export CUDA_VISIBLE_DEVICES=""  # torch sees no GPU: gloo, fp32, megatron's local layer spec
    PRESET=${PRESET:-qwen3-tiny}
    SEQ_LENGTH=${SEQ_LENGTH:-64}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}
    FP8=off
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    PRESET=${PRESET:-qwen3-$SIZE}
    FP8=${FP8:-hybrid}
    export CUDA_DEVICE_MAX_CONNECTIONS=1          # megatron: keep TP communication ordered
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a dead rank aborts the job instead of hanging it
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-4}
fi

DATA_PREFIX=${DATA_PREFIX:-${DATA_ROOT:-$REPO/data}/$RECIPE/pretrain}
OUTPUT_ROOT=${OUTPUT_ROOT:-$REPO/runs}
RUN_DIR=${RUN_DIR:-$OUTPUT_ROOT/pretrain_${recipe_lc}_${SIZE}}
mkdir -p "$RUN_DIR"

# Rendezvous from the allocation (ccmega.runtime reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID itself).
if [ -n "${SLURM_JOB_ID:-}" ]; then
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
fi
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NODES ))}}

args=(pretrain --run-dir "$RUN_DIR" --preset "$PRESET" --data "$DATA_PREFIX")
[ -n "${TOKENIZER:-}" ] && args+=(--tokenizer "$TOKENIZER")
[ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
[ -n "${TP:-}" ] && args+=(--tp "$TP")
[ -n "${PP:-}" ] && args+=(--pp "$PP")
[ -n "${SEQ_LENGTH:-}" ] && args+=(--seq-length "$SEQ_LENGTH")
[ -n "${GLOBAL_BATCH_SIZE:-}" ] && args+=(--global-batch-size "$GLOBAL_BATCH_SIZE")
[ -n "${MICRO_BATCH_SIZE:-}" ] && args+=(--micro-batch-size "$MICRO_BATCH_SIZE")
[ -n "${SAVE_INTERVAL:-}" ] && args+=(--save-interval "$SAVE_INTERVAL")
[ -n "${EVAL_INTERVAL:-}" ] && args+=(--eval-interval "$EVAL_INTERVAL")
[ "${CCMEGA_CPU:-0}" = "1" ] || args+=(--set train.distributed_optimizer=true)
if [ "$FP8" != "off" ]; then
    args+=(--fp8 "$FP8" --fp8-recipe "${FP8_RECIPE:-tensorwise}" --fp8-bf16-layers "${FP8_BF16_LAYERS:-1}")
fi
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && args+=($EXTRA_ARGS)

echo "[launch_pretrain] job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}: $RECIPE $PRESET on" \
     "$NODES node(s) x $GPUS_PER_NODE task(s); master ${MASTER_ADDR:-local}:${MASTER_PORT:-}; run dir $RUN_DIR"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --ntasks=$((NODES * GPUS_PER_NODE)) \
     --kill-on-bad-exit=1 \
     "$PYTHON" -m ccmega.cli "${args[@]}" &
SRUN_PID=$!
forward() { echo "[launch_pretrain] got $1: asking the tasks to checkpoint and stop"; kill -s "$1" "$SRUN_PID" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives: wait again until srun itself has exited.
while true; do
    wait "$SRUN_PID"; rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [ $rc -eq 0 ] && grep -q '"state": "interrupted"' "$RUN_DIR/status.json" 2>/dev/null; then
    if [ -n "${SLURM_JOB_ID:-}" ] && [ "${CCMEGA_NO_REQUEUE:-0}" != "1" ]; then
        echo "[launch_pretrain] checkpoint saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
fi
echo "[launch_pretrain] srun exited with $rc"
exit $rc
