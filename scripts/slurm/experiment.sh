#!/bin/bash
# The experiment runner across a SLURM cluster: sequential stages in single jobs, exploration and evaluation as job
# arrays (--shard K/N: task i of the sorted task ids goes to shard i mod N; each shard writes its own files; the next
# sequential job merges them, checking every task is present exactly once). Every job is the same resumable command,
# so a failed or preempted job is simply resubmitted.
#
#   bash scripts/slurm/experiment.sh configs/experiments/sciworld-smollm2.yaml 8
#
# Edit the #SBATCH-style options in SBATCH_* below for your cluster (partition, GPUs, time).
set -euo pipefail
CONFIG=${1:?usage: experiment.sh EXPERIMENT.yaml [SHARDS]}
SHARDS=${2:-8}
RUN="python -m hpl_lightning.experiment -c $CONFIG"
SBATCH_GPU=${SBATCH_GPU:-"--gres=gpu:1 --cpus-per-task=16 --mem=128G --time=24:00:00"}
SBATCH_CPU=${SBATCH_CPU:-"--cpus-per-task=8 --mem=32G --time=12:00:00"}
submit() {  # submit DEPENDENCY SBATCH_OPTIONS COMMAND -> job id
  local dep=$1 opts=$2 cmd=$3
  sbatch --parsable ${dep:+--dependency=afterok:$dep} $opts --wrap "$cmd"
}
# 1. expert import, SFT, segmentation (one GPU)
prep=$(submit "" "$SBATCH_GPU" "$RUN --stop_before explore")
# 2. exploration, N shards (each runs the SFT policy locally, or pass --serving.* to serve it per shard)
explore=$(submit "$prep" "$SBATCH_GPU --array=0-$((SHARDS - 1))" \
  "$RUN --shard \$SLURM_ARRAY_TASK_ID/$SHARDS --stage explore")
# 3. merge exploration, pairs, one training run per (arm, seed) (one GPU; runs are resumable: --ckpt_path last)
train=$(submit "$explore" "$SBATCH_GPU" "$RUN --stop_before evaluate")
# 4. evaluation of every checkpoint on every split, N shards
evaluate=$(submit "$train" "$SBATCH_GPU --array=0-$((SHARDS - 1))" \
  "$RUN --shard \$SLURM_ARRAY_TASK_ID/$SHARDS --stage evaluate")
# 5. merge evaluations, results.md / results.json / results.png
submit "$evaluate" "$SBATCH_CPU" "$RUN"
echo "submitted: prep $prep, explore $explore, train $train, evaluate $evaluate"
