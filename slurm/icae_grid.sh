#!/bin/bash
# Submit the ICAE fine-tuning runs of the paper, each after the pretraining runs it needs. The paper's
# Fig. 4 and Tables 3-5 hold 24 distinct (encoder, decoder, fine-tune/test data) triples:
#   fig4     encoder D1 500M, decoders D1..D6 500M, data D1                                     6 runs
#   table3   D1/D1, D1/D6, D6/D1, D1/D2, D2/D1 (encoder/decoder, 500M), data D1           +2 new (D6/D1, D2/D1)
#   table4   on data D1 and on data D6: encoder D1 {200M,500M,800M,1B} -> decoder D6 500M and encoder
#            D6 500M -> decoder D1 {sizes}; reference D1/D1 500M on D1, D6/D6 500M on D6         +15 new
#            (Fig. 5 plots these runs' F1 against FLOPs: they are tagged "table4 fig5")
#   table5   encoder D1 500M -> decoder pretrained on random text (500M), data D1                +1 new
# A run shared by several of them is submitted once. Anything else only with --extra.
#
#   slurm/icae_grid.sh [--subset fig4,table3,table4,fig5,table5] [--match REGEX] [--extra NAME,...] [--retry-failed]
#                      [--dry-run] [--list]
#
# Run names: enc-<recipe>-<size>_dec-<recipe>-<size>_data-<recipe> (e.g. enc-d1-500m_dec-d6-500m_data-d1; the
# data is both the fine-tuning split $DATA_ROOT/<RECIPE>/finetune and the test split of the evaluation).
# --subset keeps the runs that feed one of the named tables/figures (default: all 24); --list prints
# "NAME  feeds: fig4 table3 ..." per run; --match keeps the runs whose name matches the extended regex;
# --extra adds runs by name (listed as "feeds: extra" when they are not the paper's).
#
# For each pretrained model a run needs ($OUTPUT_ROOT/pretrain_<recipe>_<size>), in this order:
#   (1) a job named ccmega-pretrain-<recipe>-<size> of yours is queued (pending, running, requeued)
#       -> --dependency=afterok on it;
#   (2) its status.json says finished (state "finished", iteration == steps) -> no dependency;
#   (3) it diverged, or it failed (state "failed": it died of an error, printed from status.json) -> refused:
#       its fine-tuning runs are not submitted (exit status 1 at the end). Once the cause is fixed,
#       --retry-failed submits failed runs again (they resume from their latest checkpoint);
#   (4) otherwise (never run, interrupted, killed) it is submitted (slurm/pretrain_<recipe>_<size>.sh, or
#       slurm/launch_pretrain.sh with RECIPE=random; it resumes from its latest checkpoint) and the
#       fine-tuning job depends on it (afterok; --kill-on-invalid-dep=yes cancels it if pretraining fails).
# A checkpoint on disk alone never counts as finished. Fine-tuning runs already finished (same rule) or
# queued (by job name ccmega-icae-<name>) are skipped, so the grid can be re-run safely; failed ones are
# reported with their error and refused like (3), unless --retry-failed.
#
# Environment: OUTPUT_ROOT (<repo>/runs), DATA_ROOT (<repo>/data: fine-tune data = $DATA_ROOT/<RECIPE>/finetune),
# SBATCH_ARGS (extra sbatch options for every job, e.g. a CPU cluster's "--nodes=1 --ntasks=1 --gpus-per-node=0"),
# PRETRAIN_SBATCH_ARGS / ICAE_SBATCH_ARGS (for one kind only), PYTHON (reads status.json), and every variable
# of slurm/icae_finetune.sh and slurm/launch_pretrain.sh (CCMEGA_CPU, STEPS, MEMORY_SLOTS, ...), which sbatch
# passes on to the jobs.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CCMEGA_HOME=${CCMEGA_HOME:-$REPO} OUTPUT_ROOT=${OUTPUT_ROOT:-$REPO/runs}
DATA_ROOT=${DATA_ROOT:-$REPO/data}
# shellcheck source=slurm/ccmega_job.sh
source "$REPO/slurm/ccmega_job.sh"  # run_state
"${PYTHON:-python}" -c "" 2>/dev/null || { echo "icae_grid: PYTHON=${PYTHON:-python} does not run (it reads status.json)" >&2; exit 2; }
subsets=fig4,table3,table4,table5 match="" extras="" dry_run=0 list=0 retry_failed=0
while [ $# -gt 0 ]; do
    case $1 in
        --subset) subsets=$2; shift 2 ;;
        --match) match=$2; shift 2 ;;
        --extra) extras=${extras:+$extras,}$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --list) list=1; shift ;;
        --retry-failed) retry_failed=1; shift ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        *) echo "icae_grid: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# ---- the runs: "enc_recipe enc_size dec_recipe dec_size data_recipe", with what each feeds --------------
declare -A feeds=()
order=()
add_run() {  # "TABLE/FIGURE..." ENC_RECIPE ENC_SIZE DEC_RECIPE DEC_SIZE DATA
    local tag run="$2 $3 $4 $5 $6"
    [ -n "${feeds[$run]:-}" ] || order+=("$run")
    for tag in $1; do
        [[ " ${feeds[$run]:-} " == *" $tag "* ]] || feeds[$run]=${feeds[$run]:+${feeds[$run]} }$tag
    done
}
paper_runs() {  # SUBSET
    local data size enc dec
    case $1 in
        fig4) for dec in d1 d2 d3 d4 d5 d6; do add_run fig4 d1 500m $dec 500m d1; done ;;
        table3) for pair in "d1 d1" "d1 d6" "d6 d1" "d1 d2" "d2 d1"; do
                    read -r enc dec <<<"$pair"; add_run table3 "$enc" 500m "$dec" 500m d1
                done ;;
        table4) for data in d1 d6; do
                    for size in 200m 500m 800m 1b; do
                        add_run "table4 fig5" d1 $size d6 500m $data; add_run "table4 fig5" d6 500m d1 $size $data
                    done
                    add_run "table4 fig5" $data 500m $data 500m $data  # the aligned reference of each data
                done ;;
        table5) add_run table5 d1 500m random 500m d1 ;;
    esac
}
for subset in fig4 table3 table4 table5; do paper_runs $subset; done
for subset in ${subsets//,/ }; do
    case $subset in fig4|table3|table4|fig5|table5) ;;
        *) echo "icae_grid: unknown subset $subset (fig4, table3, table4, fig5, table5)" >&2; exit 2 ;;
    esac
done
name_re='^enc-(d[1-6]|random)-(200m|500m|800m|1b)_dec-(d[1-6]|random)-(200m|500m|800m|1b)_data-(d[1-6]|random)$'
for name in ${extras//,/ }; do
    if ! [[ $name =~ $name_re ]]; then
        echo "icae_grid: --extra $name is not a run name (enc-<recipe>-<size>_dec-<recipe>-<size>_data-<recipe>)" >&2
        exit 2
    fi
    add_run extra "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}" "${BASH_REMATCH[4]}" "${BASH_REMATCH[5]}"
done
name_of() { echo "enc-$1-$2_dec-$3-$4_data-$5"; }
data_folder() { if [ "$1" = random ]; then echo random; else echo "${1^^}"; fi; }  # ccmega preprocess's names
in_subsets() {  # "TAG..." -> true when one of them is a chosen subset (or "extra")
    local tag
    for tag in $1; do [[ ",$subsets,extra," == *",$tag,"* ]] && return 0; done
    return 1
}
selected=()
for run in "${order[@]}"; do
    # shellcheck disable=SC2086
    name=$(name_of $run)
    in_subsets "${feeds[$run]}" || continue
    if [ -z "$match" ] || [[ $name =~ $match ]]; then selected+=("$run"); fi
done
if [ $list = 1 ]; then
    # shellcheck disable=SC2086
    for run in "${selected[@]}"; do printf '%-40s feeds: %s\n' "$(name_of $run)" "${feeds[$run]}"; done
    exit 0
fi
[ ${#selected[@]} -gt 0 ] || { echo "icae_grid: no run matches" >&2; exit 2; }

submit() {  # sbatch ARGS... -> prints the job id (or a fake one with --dry-run)
    if [ $dry_run = 1 ]; then echo "[dry-run] sbatch $*" >&2; echo "DRYRUN$RANDOM"; return; fi
    sbatch --parsable "$@" | cut -d';' -f1
}
queued_job() {  # JOB_NAME -> the id of your first queued job of that name ("" if none); fails if squeue does
    local out
    if ! out=$(squeue -h -u "$(id -un)" -n "$1" -o %i 2>&1); then
        if [ $dry_run = 1 ]; then echo ""; return 0; fi  # a dry run also works where SLURM is not reachable
        echo "icae_grid: squeue failed ($out): cannot tell which jobs are queued; not submitting" >&2
        return 1
    fi
    echo "$out" | head -n 1
}

run_error() {  # RUN_DIR -> the error of a run whose status.json says "failed" ("" for any other state)
    "${PYTHON:-python}" - "$1/status.json" <<'EOF'
import json, sys
try:
    with open(sys.argv[1]) as f:
        status = json.load(f)
except (OSError, ValueError):
    sys.exit()
if isinstance(status, dict) and status.get("state") == "failed":
    print(status.get("error") or "no error recorded")
EOF
}

declare -A pretrain_job=()
refused=0
pretrain_dependency() {  # recipe size: sets DEP to "" (finished), a job id, or "refused" (no subshell: keeps the cache)
    local recipe=$1 size=$2 key="$1-$2" id state error
    local run_dir=$OUTPUT_ROOT/pretrain_${recipe}_${size} job_name=ccmega-pretrain-$recipe-$size
    if [ -z "${pretrain_job[$key]+x}" ]; then
        id=$(queued_job "$job_name") || exit 1
        state=$(run_state "$run_dir")
        error=$(run_error "$run_dir")
        [ -z "$error" ] || state=failed
        if [ -n "$id" ]; then
            pretrain_job[$key]=$id
            echo "icae_grid: pretrained $key: job $id already queued (status: $state)" >&2
        elif [ "$state" = finished ]; then
            pretrain_job[$key]=""
            echo "icae_grid: pretrained $key: finished ($run_dir/status.json)" >&2
        elif [ "$state" = diverged ]; then
            pretrain_job[$key]=refused
            echo "icae_grid: pretrained $key: DIVERGED ($run_dir/status.json); not resubmitting it, and not" \
                 "submitting the fine-tuning runs that need it. Fix the run (lower LR, restart from an earlier" \
                 "checkpoint) and re-run the grid." >&2
        elif [ "$state" = failed ] && [ $retry_failed = 0 ]; then
            pretrain_job[$key]=refused
            echo "icae_grid: pretrained $key: FAILED: $error ($run_dir/status.json; the traceback is in its" \
                 "job's log). Not resubmitting it, and not submitting the fine-tuning runs that need it. Fix the" \
                 "cause and re-run the grid with --retry-failed." >&2
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
            echo "icae_grid: pretrained $key: submitted job $id (status: $state)" >&2
        fi
    fi
    DEP=${pretrain_job[$key]}
}

submitted=0
for run in "${selected[@]}"; do
    read -r er es dr ds data <<<"$run"
    name=$(name_of $er $es $dr $ds $data)
    run_dir=$OUTPUT_ROOT/icae_$name
    if [ "$(run_state "$run_dir")" = finished ]; then
        echo "icae_grid: $name: finished already ($run_dir)"; continue
    fi
    id=$(queued_job "ccmega-icae-$name") || exit 1
    if [ -n "$id" ]; then
        echo "icae_grid: $name: job $id already queued"; continue
    fi
    error=$(run_error "$run_dir")
    if [ -n "$error" ] && [ $retry_failed = 0 ]; then
        echo "icae_grid: $name: FAILED: $error ($run_dir/status.json); NOT resubmitted (fix the cause, then" \
             "--retry-failed)"
        refused=$((refused + 1)); continue
    fi
    pretrain_dependency "$er" "$es"; deps=$DEP
    pretrain_dependency "$dr" "$ds"
    if [ "$deps" = refused ] || [ "$DEP" = refused ]; then
        echo "icae_grid: $name: NOT submitted (a pretraining run it needs diverged)"; refused=$((refused + 1)); continue
    fi
    [ -n "$DEP" ] && [ "$DEP" != "$deps" ] && deps=${deps:+$deps:}$DEP
    dep_args=()
    [ -n "$deps" ] && dep_args=(--dependency="afterok:$deps" --kill-on-invalid-dep=yes)
    # shellcheck disable=SC2086
    id=$(submit --job-name="ccmega-icae-$name" "${dep_args[@]}" ${SBATCH_ARGS:-} ${ICAE_SBATCH_ARGS:-} \
         --export=ALL,ENC=$OUTPUT_ROOT/pretrain_${er}_${es},DEC=$OUTPUT_ROOT/pretrain_${dr}_${ds},ENC_PRESET=qwen3-$es,DEC_PRESET=qwen3-$ds,DATA=$DATA_ROOT/$(data_folder "$data")/finetune,VALID_DATA=${VALID_DATA:-},RUN_DIR=$run_dir \
         "$REPO/slurm/icae_finetune.sh")
    echo "icae_grid: $name: submitted job $id${deps:+ after $deps} (feeds: ${feeds[$run]})"
    submitted=$((submitted + 1))
done
echo "icae_grid: ${#selected[@]} run(s) selected, $submitted submitted$([ $refused = 0 ] || echo ", $refused refused")"
[ $refused = 0 ]
