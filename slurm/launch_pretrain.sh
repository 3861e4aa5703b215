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
#   NODES, GPUS_PER_NODE   srun layout inside the allocation (default: the allocation's; with DRY_RUN=1
#                   the per-model script's #SBATCH --nodes / --ntasks-per-node)
#   STEPS, TP, PP, SEQ_LENGTH, GLOBAL_BATCH_SIZE, MICRO_BATCH_SIZE, SAVE_INTERVAL, EVAL_INTERVAL
#   FP8             hybrid (default on GPU), e4m3, or "off";  FP8_RECIPE (tensorwise), FP8_BF16_LAYERS (1)
#   CCMEGA_CPU=1    CPU cluster: no GPUs visible, gloo, fp32, no FP8, tiny preset and short sequences
#   EXTRA_ARGS      appended to the ccmega command line, e.g. "--set optim.max_lr=1e-3"
#   PYTHON          interpreter (python)
#   DRY_RUN=1       no srun: `ccmega pretrain ... --dry-run --world-size NODES*GPUS_PER_NODE` as one process
#                   here (login or CPU node), e.g. `DRY_RUN=1 bash slurm/pretrain_d6_1b.sh`
#
# Preemption / time limit: SLURM sends USR1 to this shell 300 s before the end (#SBATCH
# --signal=B:USR1@300) or TERM on preemption; the shell forwards it to the tasks, which save a
# checkpoint at the next step boundary and exit 0 with RUN_DIR/status.json saying "interrupted";
# the shell then requeues the job (`scontrol requeue`), and the requeued job resumes from `latest`.
# srun, the signals, the requeue and DRY_RUN live in slurm/ccmega_job.sh (shared with icae_finetune.sh).
set -uo pipefail

: "${RECIPE:?set RECIPE (D1..D6)}" "${SIZE:?set SIZE (200m, 500m, 800m, 1b)}"
REPO=${CCMEGA_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-python}
recipe_lc=$(echo "$RECIPE" | tr '[:upper:]' '[:lower:]')

if [ "${CCMEGA_CPU:-0}" = "1" ]; then
    PRESET=${PRESET:-qwen3-tiny}
    SEQ_LENGTH=${SEQ_LENGTH:-64}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}
    FP8=off
else
    PRESET=${PRESET:-qwen3-$SIZE}
    FP8=${FP8:-hybrid}
fi
# shellcheck source=slurm/ccmega_job.sh
source "$REPO/slurm/ccmega_job.sh"
job_environment || exit $?

DATA_PREFIX=${DATA_PREFIX:-${DATA_ROOT:-$REPO/data}/$RECIPE/pretrain}
OUTPUT_ROOT=${OUTPUT_ROOT:-$REPO/runs}
RUN_DIR=${RUN_DIR:-$OUTPUT_ROOT/pretrain_${recipe_lc}_${SIZE}}

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
if [ "$FP8" != "off" ]; then
    args+=(--fp8 "$FP8" --fp8-recipe "${FP8_RECIPE:-tensorwise}" --fp8-bf16-layers "${FP8_BF16_LAYERS:-1}")
fi

echo "[launch_pretrain] job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}: $RECIPE $PRESET on" \
     "$NODES node(s) x $GPUS_PER_NODE task(s); master ${MASTER_ADDR:-local}:${MASTER_PORT:-}; run dir $RUN_DIR"
run_ccmega launch_pretrain "$RUN_DIR" "${args[@]}"
