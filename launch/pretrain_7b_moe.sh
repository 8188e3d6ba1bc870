#!/usr/bin/env bash
# launch/pretrain_7b_moe.sh: the 7B mixture-of-experts model (configs/7b_moe.yaml: PP 2 x EP 8) on SLURM.
# The body is launch/common.sh (environment, rendezvous, signals, requeue, --dry-run); this file holds
# the job's size and the preset.
#
#   DATA_PATHS=/data/ds RUN_DIR=/shared/runs/7b_moe sbatch launch/pretrain_7b_moe.sh [section.key=value ...]
#   DATA_PATHS=synthetic RUN_DIR=/tmp/r bash launch/pretrain_7b_moe.sh --dry-run        # the commands and the resolved config
#
#SBATCH --job-name=megafusion-7b_moe
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# --signal=B:USR1@300: SIGUSR1 to this batch shell 300 s before the time limit (common.sh forwards it to every
# rank: save, exit, requeue). --open-mode=append: a requeued start appends to the same %x-%j.out.
set -euo pipefail

# sbatch runs a copy of this file from its spool folder: find the checkout by MEGAFUSION_HOME, else this file's
# folder, else the folder sbatch was called from.
MF_HOME=${MEGAFUSION_HOME:-}
if [ -z "$MF_HOME" ]; then
    for dir in "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
        if [ -f "$dir/launch/common.sh" ]; then MF_HOME=$(cd "$dir" && pwd); break; fi
    done
fi
if [ ! -f "${MF_HOME:-.}/launch/common.sh" ]; then
    echo "megafusion launch: error: cannot find launch/common.sh: set MEGAFUSION_HOME to the megafusion checkout" >&2
    exit 2
fi
export PYTHONPATH="$MF_HOME${PYTHONPATH:+:$PYTHONPATH}"   # megafusion imports from the checkout even if not installed
MF_PRESET=7b_moe
# shellcheck source=launch/common.sh
. "$MF_HOME/launch/common.sh"
mf_main "$@"
