#!/bin/bash
# Paper model LLM_D5(800M): qwen3-800m (800 M parameters, Table 2) pretrained on D5 =
# 2/6 Pile-CC + 4/6 (ArXiv:Github:DM Mathematics = 2:2:1).
# Defaults: 16 nodes x 8 GPUs (128 GPUs), bf16 + FP8 (hybrid). Everything else: slurm/launch_pretrain.sh.
# #SBATCH lines cannot read the environment: override them on the sbatch command line, e.g. a CPU test:
#   CCMEGA_CPU=1 STEPS=5 DATA_ROOT=... sbatch --nodes=1 --ntasks=2 --ntasks-per-node=2 --gpus-per-node=0 slurm/pretrain_d5_800m.sh
# Check the real layout on a login/CPU node first (one process, no srun): DRY_RUN=1 bash slurm/pretrain_d5_800m.sh
#SBATCH --job-name=ccmega-pretrain-d5-800m
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# JOB_SCRIPT: this file (or sbatch's copy of it), whose #SBATCH defaults a DRY_RUN=1 checks
export RECIPE=D5 SIZE=800m JOB_SCRIPT=$0
# sbatch runs a copy of this file: find the checkout through the job's Command= (or CCMEGA_HOME)
script=$(scontrol show job "${SLURM_JOB_ID:-none}" -o 2>/dev/null | grep -oP 'Command=\K\S+')
exec bash "${CCMEGA_HOME:-$(dirname "${script:-$0}")/..}/slurm/launch_pretrain.sh"
