# Shared by the train_*.sh scripts, which source it with a recipe (configs/recipe_*.yaml) and a cluster
# (configs/cluster/*.yaml) before the seed's four arguments:
#   source examples/recipe.sh RECIPE CLUSTER MODEL_PATH DATA_JSONL ID2INFO_JSON MAX_NEW_TOKENS [overrides...]
# It prints the plan first (`areal-async plan`: which GPU runs what and each GPU's memory, no GPU needed) and
# stops when the run does not fit; then it trains. Anything after the four arguments is a config override.
#   DRY_RUN=1   print the resolved configuration only     PLAN=1   print the plan only
#   RUN_NAME    the run folder under outputs/ (default: <recipe>-<cluster>-<MAX_NEW_TOKENS>)
#   AREAL_ASYNC the command (default: areal-async; e.g. "python -m areal_async.run.cli")
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: bash $0 MODEL_PATH DATA_JSONL ID2INFO_JSON MAX_NEW_TOKENS [overrides...]"
  sed -n '4,8p' "${BASH_SOURCE[0]}"
  exit 2
fi
RECIPE=$1 CLUSTER=$2 MODEL_PATH=$3 DATA_JSONL=$4 ID2INFO_JSON=$5 MAX_NEW_TOKENS=$6
shift 6
read -r -a CLI <<< "${AREAL_ASYNC:-areal-async}"
ARGS=(--config "$RECIPE" cluster="$CLUSTER" run_name="${RUN_NAME:-${RECIPE#recipe_}-$CLUSTER-$MAX_NEW_TOKENS}"
      model.path="$MODEL_PATH" data.path="$DATA_JSONL" data.id2info_path="$ID2INFO_JSON"
      generation.max_new_tokens="$MAX_NEW_TOKENS" "$@")
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -n "${DRY_RUN:-}" ]; then
  exec "${CLI[@]}" train "${ARGS[@]}" --cfg
fi
"${CLI[@]}" plan "${ARGS[@]}"
if [ -z "${PLAN:-}" ]; then
  exec "${CLI[@]}" train "${ARGS[@]}"
fi
