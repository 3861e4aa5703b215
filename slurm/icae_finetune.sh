#!/bin/bash
# One ICAE fine-tuning run (paper §3.3, Table 7): `ccmega icae-train` with one task per GPU through srun.
#   ENC=runs/pretrain_d1_500m DEC=runs/pretrain_d6_500m DATA=data/D1/finetune sbatch slurm/icae_finetune.sh
# Defaults: 4 nodes x 8 GPUs (32 GPUs x 32 samples = global batch 1024), bf16, Table 7 hyperparameters.
# Variables (sbatch passes the environment to the job):
#   ENC, DEC        pretraining checkpoints (run dir, checkpoints dir or iter dir) of encoder and frozen decoder
#   DATA            fine-tune split prefix (OUT/<recipe>/finetune); VALID_DATA optional (OUT/<recipe>/test)
#   RUN_DIR         output (default $OUTPUT_ROOT/icae_<basename ENC>__<basename DEC>; OUTPUT_ROOT=<repo>/runs)
#   MEMORY_SLOTS, RATIO, CONTEXT_TOKENS, STEPS, EPOCHS, MICRO_BATCH_SIZE, LR, WARMUP_STEPS, TP,
#   SAVE_INTERVAL, EVAL_INTERVAL            forwarded as flags when set
#   DISTRIBUTED_OPTIMIZER=true             shard Adam state over DP (off by default)
#   NODES, GPUS_PER_NODE                    srun layout inside the allocation (default: the allocation's)
#   CCMEGA_CPU=1    CPU cluster: no GPUs visible, gloo, fp32 (override the allocation on the sbatch line:
#                   sbatch --nodes=1 --ntasks=1 --gpus-per-node=0 ...)
#   EXTRA_ARGS      appended to the command line, e.g. "--set optim.max_lr=5e-5";  PYTHON, CCMEGA_HOME
# Preemption / time limit: USR1 (300 s before the end) or TERM -> checkpoint at the next step, exit 0,
# requeue; the requeued job resumes from RUN_DIR/checkpoints/latest (as slurm/launch_pretrain.sh).
#SBATCH --job-name=ccmega-icae
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

: "${ENC:?set ENC (encoder pretraining run dir)}" "${DEC:?set DEC (decoder pretraining run dir)}" \
  "${DATA:?set DATA (fine-tune split prefix, e.g. data/D1/finetune)}"
# sbatch runs a copy of this file: find the checkout through the job's Command= (or CCMEGA_HOME)
script=$(scontrol show job "${SLURM_JOB_ID:-none}" -o 2>/dev/null | grep -oP 'Command=\K\S+')
REPO=${CCMEGA_HOME:-$(cd "$(dirname "${script:-${BASH_SOURCE[0]}}")/.." && pwd)}
PYTHON=${PYTHON:-python}
OUTPUT_ROOT=${OUTPUT_ROOT:-$REPO/runs}
RUN_DIR=${RUN_DIR:-$OUTPUT_ROOT/icae_$(basename "$ENC")__$(basename "$DEC")}
mkdir -p "$RUN_DIR"

if [ "${CCMEGA_CPU:-0}" = "1" ]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
fi
if [ -n "${SLURM_JOB_ID:-}" ]; then
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
fi
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NODES ))}}

args=(icae-train --encoder "$ENC" --decoder "$DEC" --data "$DATA" --run-dir "$RUN_DIR")
add() { [ -n "${2:-}" ] && args+=("$1" "$2"); }
add --valid-data "${VALID_DATA:-}"; add --memory-slots "${MEMORY_SLOTS:-}"; add --ratio "${RATIO:-}"
add --context-tokens "${CONTEXT_TOKENS:-}"; add --steps "${STEPS:-}"; add --epochs "${EPOCHS:-}"
add --micro-batch-size "${MICRO_BATCH_SIZE:-}"; add --lr "${LR:-}"; add --warmup-steps "${WARMUP_STEPS:-}"
add --tp "${TP:-}"; add --save-interval "${SAVE_INTERVAL:-}"; add --eval-interval "${EVAL_INTERVAL:-}"
add --distributed-optimizer "${DISTRIBUTED_OPTIMIZER:-}"
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && args+=($EXTRA_ARGS)

echo "[icae_finetune] job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}: encoder $ENC, decoder $DEC," \
     "data $DATA on $NODES node(s) x $GPUS_PER_NODE task(s); run dir $RUN_DIR"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --ntasks=$((NODES * GPUS_PER_NODE)) --kill-on-bad-exit=1 \
     "$PYTHON" -m ccmega.cli "${args[@]}" &
SRUN_PID=$!
forward() { echo "[icae_finetune] got $1: asking the tasks to checkpoint and stop"; kill -s "$1" "$SRUN_PID" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while true; do
    wait "$SRUN_PID"; rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [ $rc -eq 0 ] && grep -q '"state": "interrupted"' "$RUN_DIR/status.json" 2>/dev/null \
   && [ -n "${SLURM_JOB_ID:-}" ] && [ "${CCMEGA_NO_REQUEUE:-0}" != "1" ]; then
    echo "[icae_finetune] checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
echo "[icae_finetune] srun exited with $rc"
exit $rc
