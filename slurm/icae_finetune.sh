#!/bin/bash
# One ICAE fine-tuning run (paper §3.3, Table 7): `ccmega icae-train` with one task per GPU through srun.
#   ENC=runs/pretrain_d1_500m DEC=runs/pretrain_d6_500m DATA=data/D1/finetune sbatch slurm/icae_finetune.sh
# Defaults: 4 nodes x 8 GPUs, bf16, Table 7 hyperparameters. Table 7's 32 samples per GPU (global batch
# 1024 on 32 GPUs) run as 2 micro-batches of 16: at 32 the paper's pairs need more than an 80 GB GPU by the
# estimate `DRY_RUN=1` prints (validated against measured peaks: benchmarks/icae_memory.py).
# Variables (sbatch passes the environment to the job):
#   ENC, DEC        pretraining checkpoints (run dir, checkpoints dir or iter dir) of encoder and frozen decoder
#   DATA            fine-tune split prefix (OUT/<recipe>/finetune); VALID_DATA optional (OUT/<recipe>/test)
#   RUN_DIR         output (default $OUTPUT_ROOT/icae_<basename ENC>__<basename DEC>; OUTPUT_ROOT=<repo>/runs)
#   MEMORY_SLOTS, RATIO, CONTEXT_TOKENS, STEPS, EPOCHS, LR, WARMUP_STEPS, TP,
#   SAVE_INTERVAL, EVAL_INTERVAL            forwarded as flags when set
#   MICRO_BATCH_SIZE (default 16), GLOBAL_BATCH_SIZE (default 32 per data-parallel rank: 32 x GPUs / TP)
#   DISTRIBUTED_OPTIMIZER=true             shard Adam state over DP (off by default)
#   NODES, GPUS_PER_NODE                    srun layout inside the allocation (default: the allocation's;
#                                           with DRY_RUN=1 this file's #SBATCH --nodes / --ntasks-per-node)
#   CPUS_PER_TASK, GPU_BIND                 srun's --cpus-per-task (default: the node's CPUs / tasks) and
#                                           --gpu-bind (default none: ccmega uses cuda:SLURM_LOCALID); slurm/README.md
#   CCMEGA_CPU=1    CPU cluster: no GPUs visible, gloo, fp32 (override the allocation on the sbatch line:
#                   sbatch --nodes=1 --ntasks=1 --gpus-per-node=0 ...)
#   EXTRA_ARGS      appended to the command line, e.g. "--set optim.max_lr=5e-5";  PYTHON, CCMEGA_HOME
#   ENC_PRESET, DEC_PRESET  with DRY_RUN=1: the presets to build when ENC / DEC are not on this machine
#   DRY_RUN=1       no srun: `ccmega icae-train ... --dry-run --world-size NODES*GPUS_PER_NODE` as one process
#                   here (login or CPU node): ENC=... DEC=... DATA=... DRY_RUN=1 bash slurm/icae_finetune.sh
# Preemption / time limit: USR1 (300 s before the end) or TERM -> checkpoint at the next step, exit 0,
# requeue; the requeued job resumes from RUN_DIR/checkpoints/latest. srun, signals, requeue and DRY_RUN:
# slurm/ccmega_job.sh, shared with slurm/launch_pretrain.sh.
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

JOB_SCRIPT=${BASH_SOURCE[0]}  # this file (or sbatch's copy): its #SBATCH defaults are what DRY_RUN=1 checks
# shellcheck source=slurm/ccmega_job.sh
source "$REPO/slurm/ccmega_job.sh"
job_environment || exit $?

args=(icae-train --encoder "$ENC" --decoder "$DEC" --data "$DATA" --run-dir "$RUN_DIR")
add() { [ -n "${2:-}" ] && args+=("$1" "$2"); }
add --valid-data "${VALID_DATA:-}"; add --memory-slots "${MEMORY_SLOTS:-}"; add --ratio "${RATIO:-}"
add --context-tokens "${CONTEXT_TOKENS:-}"; add --steps "${STEPS:-}"; add --epochs "${EPOCHS:-}"
add --micro-batch-size "${MICRO_BATCH_SIZE:-16}"; add --global-batch-size "${GLOBAL_BATCH_SIZE:-$((32 * NODES * GPUS_PER_NODE / ${TP:-1}))}"
add --lr "${LR:-}"; add --warmup-steps "${WARMUP_STEPS:-}"
add --tp "${TP:-}"; add --save-interval "${SAVE_INTERVAL:-}"; add --eval-interval "${EVAL_INTERVAL:-}"
add --distributed-optimizer "${DISTRIBUTED_OPTIMIZER:-}"
# a dry run away from the checkpoints builds these presets instead (the grid sets them from the run's sizes)
if [ "${DRY_RUN:-0}" = "1" ]; then add --encoder-preset "${ENC_PRESET:-}"; add --decoder-preset "${DEC_PRESET:-}"; fi

echo "[icae_finetune] job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}: encoder $ENC, decoder $DEC," \
     "data $DATA on $NODES node(s) x $GPUS_PER_NODE task(s); run dir $RUN_DIR"
run_ccmega icae_finetune "$RUN_DIR" "${args[@]}"
