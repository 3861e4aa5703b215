# Sourced (not run) by slurm/launch_pretrain.sh, slurm/icae_finetune.sh and slurm/icae_grid.sh: what
# every ccmega SLURM job does the same way, in one place. Needs PYTHON (default python). Defines:
#
#   job_environment            CCMEGA_CPU=1: no GPU visible, gloo, OMP_NUM_THREADS=1, CCMEGA_DEVICE=cpu; else
#                              the NCCL settings and CCMEGA_DEVICE=cuda (a task that sees no GPU then fails at
#                              start, naming its node and CUDA_VISIBLE_DEVICES, instead of hanging the job).
#                              MASTER_ADDR/PORT from the allocation; NODES and GPUS_PER_NODE (the srun layout:
#                              the allocation's unless set; with DRY_RUN=1 the job script's #SBATCH defaults);
#                              CPUS_PER_TASK (SLURM_CPUS_PER_TASK, else the node's CPUs / GPUS_PER_NODE), which
#                              is also OMP_NUM_THREADS of a GPU task unless set
#   run_ccmega TAG RUN_DIR ARG...
#                              `python -m ccmega.cli ARG... $EXTRA_ARGS`, in $REPO (on PYTHONPATH), as one
#                              task per GPU through srun (--cpus-per-task=$CPUS_PER_TASK; GPU jobs also
#                              --gpu-bind=$GPU_BIND, default none, and --distribution=block:block: see
#                              gpu_binding); USR1/TERM are forwarded to the tasks (they checkpoint at the next
#                              step and exit 0), and the job is requeued when RUN_DIR/status.json then says
#                              "interrupted". Returns srun's code.
#                              DRY_RUN=1: one process on this node, no srun, no run dir, no requeue:
#                              `ccmega ARG... --dry-run --world-size NODES*GPUS_PER_NODE` (builds the real preset
#                              at the real layout for one rank and prints the memory/layout checks).
#   run_state RUN_DIR          prints the state of a run from RUN_DIR/status.json (written by the training loop
#                              at its start and end): finished (state "finished" and iteration == steps),
#                              interrupted, diverged, failed (died of an error), unfinished ("finished" short
#                              of its steps), running (still running, or killed), none (never ran), unreadable.

job_environment() {
    if [ "${CCMEGA_CPU:-0}" = "1" ]; then
        export CUDA_VISIBLE_DEVICES=""  # torch sees no GPU: gloo, fp32, megatron's local layer spec
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        export CCMEGA_DEVICE=cpu
    else
        export CCMEGA_DEVICE=cuda                     # ccmega refuses to start a task that sees no GPU
        export CUDA_DEVICE_MAX_CONNECTIONS=1          # megatron: keep TP communication ordered
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a dead rank aborts the job instead of hanging it
        export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
        export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
        export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-4}
    fi
    if [ "${DRY_RUN:-0}" = "1" ]; then
        # the layout the real job would get, not this (CPU) allocation's
        NODES=${NODES:-$(sbatch_default nodes)}
        GPUS_PER_NODE=${GPUS_PER_NODE:-$(sbatch_default ntasks-per-node)}
        if [ -z "$NODES" ] || [ -z "$GPUS_PER_NODE" ]; then
            echo "DRY_RUN=1: set NODES and GPUS_PER_NODE (the layout to check); no #SBATCH defaults in" \
                 "${JOB_SCRIPT:-<unknown job script>}" >&2
            return 2
        fi
        return 0
    fi
    # Rendezvous from the allocation (ccmega.runtime reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID itself).
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
        export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    fi
    NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NODES ))}}
    # srun need not inherit sbatch's --cpus-per-task (SLURM 22.05 does not): pass it. Without one, the node's
    # CPUs are shared out here rather than fixed in #SBATCH lines, so one script fits nodes of any core count.
    local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)} tasks=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
    CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-$(( cpus / tasks > 0 ? cpus / tasks : 1 ))}}
    # a GPU task's host threads on its own cores only: 8 tasks x all cores would oversubscribe the node
    [ "${CCMEGA_CPU:-0}" = "1" ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
}

# GPU binding. Every task of a node sees all of the node's GPUs (--gpu-bind=none) and ccmega binds task
# and GPU itself: the task with SLURM_LOCALID i uses cuda:i (ccmega.runtime.distributed.gpu_index), and
# refuses to start when that GPU is not there. SLURM's own per-task binding (single:1, per_task:1,
# --gpus-per-task) hides the other GPUs from each task (per-task device cgroups where ConstrainDevices
# is set), and NCCL needs to see all GPUs of a node to detect NVLink (NVIDIA/nccl#1066): it falls back
# to slower paths. GPU_BIND=single:1 (one GPU per task, the one closest to the task's CPUs by gres.conf)
# is supported too: a task that sees one GPU uses it. --distribution=block:block gives consecutive
# tasks the cores of one socket before the next (SLURM's default, block:cyclic, alternates sockets), so
# on the usual 8-GPU node (GPUs 0-3 on the first socket) task i runs on cores beside GPU i.
gpu_binding() {
    [ "${CCMEGA_CPU:-0}" = "1" ] || echo "--gpu-bind=${GPU_BIND:-none} --distribution=block:block"
}

sbatch_default() {  # OPTION: its value on the job script's "#SBATCH --OPTION=VALUE" line, if any
    [ -n "${JOB_SCRIPT:-}" ] && [ -f "$JOB_SCRIPT" ] || return 0
    sed -n "s/^#SBATCH --$1=\([0-9][0-9]*\)\$/\1/p" "$JOB_SCRIPT" | head -n 1
}

run_ccmega() {  # TAG RUN_DIR ARG...
    local tag=$1 run_dir=$2 rc
    shift 2
    # shellcheck disable=SC2206
    [ -z "${EXTRA_ARGS:-}" ] || set -- "$@" $EXTRA_ARGS
    cd "$REPO" || return 2
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    if [ "${DRY_RUN:-0}" = "1" ]; then
        echo "[$tag] dry run on $(hostname) for $NODES node(s) x $GPUS_PER_NODE GPU(s): ccmega $*" \
             "--dry-run --world-size $((NODES * GPUS_PER_NODE))"
        "${PYTHON:-python}" -m ccmega.cli "$@" --dry-run --world-size $((NODES * GPUS_PER_NODE))
        return $?
    fi
    mkdir -p "$run_dir"
    # shellcheck disable=SC2046
    srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --ntasks=$((NODES * GPUS_PER_NODE)) \
         --cpus-per-task="$CPUS_PER_TASK" $(gpu_binding) \
         --kill-on-bad-exit=1 "${PYTHON:-python}" -m ccmega.cli "$@" &
    SRUN_PID=$!
    trap "_forward_signal $tag USR1" USR1
    trap "_forward_signal $tag TERM" TERM
    # `wait` returns early when a trapped signal arrives: wait again until srun itself has exited.
    while true; do
        wait "$SRUN_PID"; rc=$?
        kill -0 "$SRUN_PID" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [ $rc -eq 0 ] && [ "$(run_state "$run_dir")" = interrupted ] && [ -n "${SLURM_JOB_ID:-}" ] \
       && [ "${CCMEGA_NO_REQUEUE:-0}" != "1" ]; then
        echo "[$tag] checkpoint saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    echo "[$tag] srun exited with $rc"
    return $rc
}

_forward_signal() {  # TAG SIGNAL
    echo "[$1] got $2: asking the tasks to checkpoint and stop"
    kill -s "$2" "$SRUN_PID" 2>/dev/null
}

run_state() {  # RUN_DIR
    "${PYTHON:-python}" - "$1/status.json" <<'EOF'
import json, sys
try:
    with open(sys.argv[1]) as f:
        status = json.load(f)
except FileNotFoundError:
    print("none")
    sys.exit()
except (OSError, ValueError):
    print("unreadable")
    sys.exit()
state = status.get("state") if isinstance(status, dict) else None
if state == "finished" and status.get("iteration") != status.get("steps"):
    state = "unfinished"
print(state if state in ("finished", "unfinished", "interrupted", "diverged", "failed", "running") else "unreadable")
EOF
}
