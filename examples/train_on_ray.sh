#!/usr/bin/env bash
# The seed's 1.5B recipe on a Ray cluster of NODES nodes with 8 GPUs each (run_n1.sh, run_n4.sh, run_n16.sh call
# this). Start Ray first on every node (`ray start --head` on one, `ray start --address=<head>:6379` on the
# others), then run this on the head node:
#   bash examples/train_on_ray.sh NODES MODEL_PATH PROMPTS_JSONL ID2INFO_JSON MAX_NEW_TOKENS [overrides...]
# Per node: 6 GPUs generate (one rollout worker each), 2 train (one FSDP learner rank each). Each stage of the
# seed's 8K -> 16K -> 24K schedule is one call with MAX_NEW_TOKENS 8192, 16384, 24000 and the previous
# stage's export as MODEL_PATH (outputs/<run>/checkpoints/final), or the same run with resume=true.
# DRY_RUN=1 prints the resolved configuration instead of training.
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
NODES=$1 MODEL_PATH=$2 PROMPTS=$3 ID2INFO=$4 MAX_NEW_TOKENS=$5
shift 5
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
LEARNER_GPUS_PER_NODE=${LEARNER_GPUS_PER_NODE:-2}
ROLLOUT_GPUS_PER_NODE=$((GPUS_PER_NODE - LEARNER_GPUS_PER_NODE))
AREAL_ASYNC=${AREAL_ASYNC:-areal-async}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec "$AREAL_ASYNC" train \
  run_name="${RUN_NAME:-r1-distill-1.5b-n${NODES}-${MAX_NEW_TOKENS}}" \
  model.path="$MODEL_PATH" model.dtype=bfloat16 \
  data.kind=areal_prompts data.path="$PROMPTS" data.id2info_path="$ID2INFO" \
  device=cuda cluster.rollout_device=cuda cluster.placement=ray cluster.address=auto \
  cluster.num_learner_ranks=$((NODES * LEARNER_GPUS_PER_NODE)) cluster.gpus_per_learner_rank=1 \
  cluster.num_rollout_workers=$((NODES * ROLLOUT_GPUS_PER_NODE)) cluster.gpus_per_rollout_worker=1 \
  rollout.groups_per_step=1024 generation.group_size=8 generation.max_new_tokens="$MAX_NEW_TOKENS" \
  generation.temperature=1.0 rollout.max_staleness=4 rollout.groups_per_request=16 \
  rollout.num_queue_shards="$NODES" rollout.queue_capacity_per_shard=2048 \
  reward.correct_reward=5 reward.incorrect_reward=-5 reward.num_workers=16 \
  ppo.lr=2e-6 ppo.lr_warmup_steps=5 ppo.kl_coef=0.001 ppo.eps_clip=0.2 ppo.behaviour_weight_cap=5 \
  ppo.behaviour_weight_mode=mask ppo.micro_batch_tokens=32768 ppo.activation_checkpointing=true \
  total_steps=1000 checkpoint_every=10 save_every=50 eval.num_samples=1 \
  "$@" ${DRY_RUN:+--cfg}
