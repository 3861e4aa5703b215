#!/bin/bash
# Submit every ICAE fine-tuning run of the paper, each after the pretraining runs it needs:
#   Fig. 4   decoders D1..D6 (500M) under a D1 (500M) encoder, data D1
#   Table 3  D1/D1, D1/D6, D6/D1, D1/D2, D2/D1 (encoder/decoder, 500M), data D1
#   Table 4  encoder D1 {200M,500M,800M,1B} -> decoder D6 500M, and encoder D6 500M -> decoder D1 {sizes},
#            plus D1/D1 and D6/D6 500M references; once with data D1, once with data D6
#   Table 5  D1 (500M) encoder -> decoder pretrained on random text (500M), data D1
# Runs shared by several experiments are submitted once (26 distinct runs in all).
#
#   slurm/icae_grid.sh [--subset fig4,table3,table4,table5] [--match REGEX] [--dry-run] [--list]
#
# Run names: enc-<recipe>-<size>_dec-<recipe>-<size>_data-<recipe> (e.g. enc-d1-500m_dec-d6-500m_data-d1);
# --match keeps the runs whose name matches the extended regex. For each pretrained model a run needs,
# in this order: (1) $OUTPUT_ROOT/pretrain_<recipe>_<size>/checkpoints/latest exists -> no dependency;
# (2) a job named ccmega-pretrain-<recipe>-<size> is pending or running -> --dependency=afterok on it;
# (3) otherwise it is submitted (slurm/pretrain_<recipe>_<size>.sh, or slurm/launch_pretrain.sh with
# RECIPE=random) and the fine-tuning job depends on it (afterok; --kill-on-invalid-dep=yes cancels it if
# the pretraining fails). Fine-tuning runs already finished (status.json) or queued (by job name) are skipped.
#
# Environment: OUTPUT_ROOT (<repo>/runs), DATA_ROOT (<repo>/data: fine-tune data = $DATA_ROOT/<recipe>/finetune),
# SBATCH_ARGS (extra sbatch options for every job, e.g. a CPU cluster's "--nodes=1 --ntasks=1 --gpus-per-node=0"),
# PRETRAIN_SBATCH_ARGS / ICAE_SBATCH_ARGS (for one kind only), and every variable of slurm/icae_finetune.sh
# and slurm/launch_pretrain.sh (CCMEGA_CPU, STEPS, MEMORY_SLOTS, ...), which sbatch passes on to the jobs.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CCMEGA_HOME=${CCMEGA_HOME:-$REPO} OUTPUT_ROOT=${OUTPUT_ROOT:-$REPO/runs}
DATA_ROOT=${DATA_ROOT:-$REPO/data}
subsets=fig4,table3,table4,table5 match="" dry_run=0 list=0
while [ $# -gt 0 ]; do
    case $1 in
        --subset) subsets=$2; shift 2 ;;
        --match) match=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --list) list=1; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "icae_grid: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# ---- the runs: "enc_recipe enc_size dec_recipe dec_size data_recipe" ------------------------------
runs=()
for subset in ${subsets//,/ }; do
    case $subset in
        fig4) for j in 1 2 3 4 5 6; do runs+=("d1 500m d$j 500m d1"); done ;;
        table3) runs+=("d1 500m d1 500m d1" "d1 500m d6 500m d1" "d6 500m d1 500m d1"
                       "d1 500m d2 500m d1" "d2 500m d1 500m d1") ;;
        table4) for data in d1 d6; do
                    for size in 200m 500m 800m 1b; do runs+=("d1 $size d6 500m $data" "d6 500m d1 $size $data"); done
                    runs+=("d1 500m d1 500m $data" "d6 500m d6 500m $data")
                done ;;
        table5) runs+=("d1 500m random 500m d1") ;;
        *) echo "icae_grid: unknown subset $subset (fig4, table3, table4, table5)" >&2; exit 2 ;;
    esac
done
name_of() { echo "enc-$1-$2_dec-$3-$4_data-$5"; }
declare -A seen=()
selected=()
for run in "${runs[@]}"; do
    # shellcheck disable=SC2086
    name=$(name_of $run)
    [ -n "${seen[$name]:-}" ] && continue
    seen[$name]=1
    if [ -z "$match" ] || [[ $name =~ $match ]]; then selected+=("$run"); fi
done
if [ $list = 1 ]; then for run in "${selected[@]}"; do name_of $run; done; exit 0; fi
[ ${#selected[@]} -gt 0 ] || { echo "icae_grid: no run matches" >&2; exit 2; }

submit() {  # sbatch ARGS... -> prints the job id (or a fake one with --dry-run)
    if [ $dry_run = 1 ]; then echo "[dry-run] sbatch $*" >&2; echo "DRYRUN$RANDOM"; return; fi
    sbatch --parsable "$@" | cut -d';' -f1
}
queued_job() { squeue -h -n "$1" -o %i 2>/dev/null | head -n 1; }

declare -A pretrain_job=()
pretrain_dependency() {  # recipe size: sets DEP to "" (checkpoint exists) or a job id (no subshell: keeps the cache)
    local recipe=$1 size=$2 key="$1-$2"
    local run_dir=$OUTPUT_ROOT/pretrain_${recipe}_${size} job_name=ccmega-pretrain-$recipe-$size
    if [ -z "${pretrain_job[$key]+x}" ]; then
        if [ -f "$run_dir/checkpoints/latest" ]; then
            pretrain_job[$key]=""
            echo "icae_grid: pretrained $key: found $run_dir" >&2
        elif id=$(queued_job "$job_name") && [ -n "$id" ]; then
            pretrain_job[$key]=$id
            echo "icae_grid: pretrained $key: job $id already queued" >&2
        else
            # shellcheck disable=SC2086
            if [ "$recipe" = random ]; then
                id=$(submit --job-name="$job_name" --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 --exclusive \
                     --time=48:00:00 --signal=B:USR1@300 --requeue --open-mode=append --output="slurm-%x-%j.out" \
                     ${SBATCH_ARGS:-} ${PRETRAIN_SBATCH_ARGS:-} --export=ALL,RECIPE=random,SIZE=$size \
                     "$REPO/slurm/launch_pretrain.sh")
            else
                id=$(submit ${SBATCH_ARGS:-} ${PRETRAIN_SBATCH_ARGS:-} "$REPO/slurm/pretrain_${recipe}_${size}.sh")
            fi
            pretrain_job[$key]=$id
            echo "icae_grid: pretrained $key: submitted job $id" >&2
        fi
    fi
    DEP=${pretrain_job[$key]}
}

submitted=0
for run in "${selected[@]}"; do
    read -r er es dr ds data <<<"$run"
    name=$(name_of $er $es $dr $ds $data)
    run_dir=$OUTPUT_ROOT/icae_$name
    if grep -q '"state": "finished"' "$run_dir/status.json" 2>/dev/null; then
        echo "icae_grid: $name: finished already ($run_dir)"; continue
    fi
    if id=$(queued_job "ccmega-icae-$name") && [ -n "$id" ]; then
        echo "icae_grid: $name: job $id already queued"; continue
    fi
    pretrain_dependency "$er" "$es"; deps=$DEP
    pretrain_dependency "$dr" "$ds"
    [ -n "$DEP" ] && [ "$DEP" != "$deps" ] && deps=${deps:+$deps:}$DEP
    dep_args=()
    [ -n "$deps" ] && dep_args=(--dependency="afterok:$deps" --kill-on-invalid-dep=yes)
    # shellcheck disable=SC2086
    id=$(submit --job-name="ccmega-icae-$name" "${dep_args[@]}" ${SBATCH_ARGS:-} ${ICAE_SBATCH_ARGS:-} \
         --export=ALL,ENC=$OUTPUT_ROOT/pretrain_${er}_${es},DEC=$OUTPUT_ROOT/pretrain_${dr}_${ds},DATA=$DATA_ROOT/${data^^}/finetune,VALID_DATA=${VALID_DATA:-},RUN_DIR=$run_dir \
         "$REPO/slurm/icae_finetune.sh")
    echo "icae_grid: $name: submitted job $id${deps:+ after $deps}"
    submitted=$((submitted + 1))
done
echo "icae_grid: ${#selected[@]} run(s) selected, $submitted submitted"
