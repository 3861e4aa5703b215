"""Writes slurm/pretrain_d{1..6}_{200m,500m,800m,1b}.sh (committed files; rerun after editing this)."""
import os

from ccmega.presets import DATASET_RECIPES, MODEL_PRESETS

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"200m": ("200M", 8), "500m": ("500M", 8), "800m": ("800M", 16), "1b": ("1B", 16)}  # label, nodes

TEMPLATE = """#!/bin/bash
# Paper model LLM_{recipe}({label}): {preset} ({params:.0f} M parameters, Table 2) pretrained on {recipe} =
# {description}.
# Defaults: {nodes} nodes x 8 GPUs ({gpus} GPUs), bf16 + FP8 (hybrid). Everything else: slurm/launch_pretrain.sh.
# #SBATCH lines cannot read the environment: override them on the sbatch command line, e.g. a CPU test:
#   CCMEGA_CPU=1 STEPS=5 DATA_ROOT=... sbatch --nodes=1 --ntasks=2 --ntasks-per-node=2 --gpus-per-node=0 slurm/pretrain_{recipe_lc}_{size}.sh
# Check the real layout on a login/CPU node first (one process, no srun): DRY_RUN=1 bash slurm/pretrain_{recipe_lc}_{size}.sh
#SBATCH --job-name=ccmega-pretrain-{recipe_lc}-{size}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# JOB_SCRIPT: this file (or sbatch's copy of it), whose #SBATCH defaults a DRY_RUN=1 checks
export RECIPE={recipe} SIZE={size} JOB_SCRIPT=$0
# sbatch runs a copy of this file: find the checkout through the job's Command= (or CCMEGA_HOME)
script=$(scontrol show job "${{SLURM_JOB_ID:-none}}" -o 2>/dev/null | grep -oP 'Command=\\K\\S+')
exec bash "${{CCMEGA_HOME:-$(dirname "${{script:-$0}}")/..}}/slurm/launch_pretrain.sh"
"""


def main():
    for k in range(1, 7):
        recipe = DATASET_RECIPES[f"D{k}"]
        for size, (label, nodes) in SIZES.items():
            preset = MODEL_PRESETS[f"qwen3-{size}"]
            path = os.path.join(HERE, f"pretrain_d{k}_{size}.sh")
            with open(path, "w") as f:
                f.write(TEMPLATE.format(recipe=recipe.name, recipe_lc=recipe.name.lower(), label=label, size=size,
                                        preset=preset.name, params=preset.total_params() / 1e6,
                                        description=recipe.description, nodes=nodes, gpus=8 * nodes))
            os.chmod(path, 0o755)
    print(f"wrote 24 scripts to {HERE}")


if __name__ == "__main__":
    main()
