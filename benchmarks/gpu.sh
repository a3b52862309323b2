#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md, by part, with the commands the docs quote.
#
#   bash benchmarks/gpu.sh wheels            # here (with network): .whl/ for an offline GPU machine
#   bash benchmarks/gpu.sh PART [OUT]        # on the GPU machine; PART: tests experts layer mfu profile
#                                            #   overhead overhead-small specialisation recompute all;
#                                            #   OUT default runs/gpu
#
# A GPU machine without megatron-core and DeepSpeed installs them from .whl/ into /tmp/site first
# (the project runs from the source tree). Each part writes its output to OUT/<part>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # progress reaches OUT/<part>.txt as it happens, also when a part is cut off
PARTS=(tests experts layer mfu profile overhead overhead-small specialisation recompute)
usage="usage: bash benchmarks/gpu.sh wheels|all|$(IFS='|'; echo "${PARTS[*]}") [OUT]"
part=${1:?$usage}
out=${2:-runs/gpu}
[[ " wheels all ${PARTS[*]} " == *" $part "* ]] || { echo "error: unknown part '$part'; $usage" >&2; exit 2; }

pin() { grep -i "^$1==" constraints.txt; }

if [[ $part == wheels ]]; then
  # Pure-Python or manylinux wheels for CPython 3.12 on x86-64; DeepSpeed has only a source release.
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin megatron-core)" "$(pin hjson)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" \
    "$(pin typing-inspection)"
  python3 -m pip wheel -q --no-deps -w .whl "$(pin deepspeed)"
  ls .whl
  exit 0
fi

if ! python3 -c "import megatron.core, deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONWARNINGS=ignore
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

# The SD-MoE paper's 2B scale (configs/sdmoe-2b.yaml) on one GPU: all 32 experts local, the built-in
# corpus, micro-batches of 2 x 4,096 tokens (58.5 GiB estimated); 4 of them per step for the profile,
# 16 for the step time (the config's own step is 64 per GPU: SD-MoE's once-per-step work is spread
# over a step's micro-batches as in training).
PAPER_2B=(configs/sdmoe-2b.yaml parallel.expert=1 "data.path=[]" data.tokenizer=null train.global_batch_size=8
          train.micro_batch_size=2 moe.diag_interval=0)
# The small configs of the earlier H100 measurements (tiny-qwen3-moe widened).
SMALL_1024=(configs/tiny-qwen3-moe.yaml model.hidden_size=1024 model.num_layers=8 model.num_attention_heads=16
            model.num_query_groups=4 moe.num_experts=16 moe.ffn_hidden_size=1024 data.seq_length=1024
            train.global_batch_size=16 train.micro_batch_size=8)

run_part() {
  case $1 in
    tests) python3 -m pytest -q -p no:warnings tests/test_gpu.py ;;
    experts) python3 benchmarks/grouped_experts.py --tokens 16384 --hidden 1024 --ffn 1024 --experts 8 16 32 64 ;;
    layer) python3 benchmarks/sdmoe_layer.py ;;  # one layer of the 2B config, 4 micro-batches
    mfu)  # if the estimate's largest model does not fit after all, the largest that does
      python3 benchmarks/mfu.py configs/qwen3-moe-1gpu.yaml --steps 30 --warmup 10 --profile \
        || python3 benchmarks/mfu.py configs/qwen3-moe-1gpu.yaml model.num_layers=13 --steps 30 --warmup 10 --profile ;;
    profile)  # operator tables of steps 16-17 (17 refreshes SD-MoE's bases) of both variants
      for variant in topk sdmoe; do
        python3 -m megatron_sdmoe.train "${PAPER_2B[@]}" moe.variant=$variant train.max_steps=17 \
          "train.profile_steps=[16, 17]" train.eval_interval=0 train.save_interval=0 train.final_checkpoint=false \
          run.dir="$out/profile-$variant" > "$out/profile-$variant.log" 2>&1
        rm -f "$out/profile-$variant"/profile/trace_rank*.json  # large; the tables are what is read
        echo "== $variant"; head -35 "$out/profile-$variant/profile/ops_rank0.txt"
      done ;;
    overhead) python3 benchmarks/overhead.py "${PAPER_2B[@]}" train.global_batch_size=32 --steps 32 --repeats 2 \
        --warmup 8 ;;
    overhead-small)
      python3 benchmarks/overhead.py "${SMALL_1024[@]}" --steps 40 --repeats 2 --warmup 10
      python3 benchmarks/overhead.py "${SMALL_1024[@]}" model.hidden_size=2048 moe.ffn_hidden_size=1408 \
        data.seq_length=2048 --steps 25 --repeats 1 --warmup 8 ;;
    recompute)  # the mfu config's step time and peak memory with each recomputation against the estimate
      for settings in train.recompute=full "train.recompute=selective train.recompute_modules=[moe]"; do
        echo "== $settings"
        # shellcheck disable=SC2086  # the settings are two words on purpose
        python3 benchmarks/mfu.py configs/qwen3-moe-1gpu.yaml $settings --steps 12 --warmup 4
      done ;;
    specialisation) python3 benchmarks/specialisation.py "${SMALL_1024[@]}" --steps 400 --diag-interval 50 \
        --out "$out/specialisation.png" ;;
  esac
}

parts=("$part")
[[ $part == all ]] && parts=("${PARTS[@]}")
for p in "${parts[@]}"; do
  echo "== $p: started $(date -u +%FT%TZ)" | tee "$out/$p.txt"
  SECONDS=0
  run_part "$p" 2>&1 | tee -a "$out/$p.txt"
  echo "== $p: ${SECONDS} s" | tee -a "$out/$p.txt"
done
