#!/usr/bin/env bash
# Prepared GPU benchmark (issue 9): ResNet-101 at 224 px, batch 32, bf16 autocast, on the digits data resized to
# 224 (the images do not change the cost): the trainer's own step for ERM, ASG with a live teacher and ASG with
# the on-disk teacher cache, then `asg train` under torchrun on 1 GPU and on every GPU present (the global
# batch of 32 split across them).
# ImageNet weights are not needed for timing (model.weights=none). Finishes within 5 minutes on one H200.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (writes gpu_results.json and torchrun logs there)
set -u
OUT=${1:-${OUT:-benchmarks/gpu_out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=${XDG_CACHE_HOME:-$PWD/.gpucache} PYTHONPATH=$PWD/src:${PYTHONPATH:-}
PY=${PYTHON:-python3}
COMMON="model.backbone=resnet101 model.weights=none data.image_size=224 data.batch_size=32 train.precision=bf16 data.num_train=2000 data.num_workers=4"
timeout 200 $PY - "$OUT" $COMMON <<'PYEOF'
import json, sys
sys.path.insert(0, "benchmarks")
from bench_trainer import trainer_step_time
out, common = sys.argv[1], sys.argv[2:]
variants = {
    "erm": ("digits_erm", []),
    "asg_live_teacher": ("digits_asg", ["teacher.cache=false"]),
    "asg_cached_teacher": ("digits_asg", ["teacher.cache=true", "teacher.cache_storage=fp16"]),
}
res = {k: trainer_step_time(r, common + o, "cuda", steps=30, warmup=5) for k, (r, o) in variants.items()}
erm = res["erm"]["step_s_median"]
ratios = {k: {"step_time_ratio": v["step_s_median"] / erm,
              "peak_mem_ratio": v["peak_mem_mib"] / res["erm"]["peak_mem_mib"]} for k, v in res.items()}
json.dump({"variants": res, "ratios_vs_erm": ratios, "settings": common}, open(f"{out}/gpu_results.json", "w"), indent=1)
for k, v in res.items():
    print(f"{k:<20} {1000 * v['step_s_median']:8.1f} ms/step  peak {v['peak_mem_mib']:8.0f} MiB  x{ratios[k]['step_time_ratio']:.3f}")
PYEOF
# DINOv2-B/14 row (issue 17): ERM vs ASG (live teacher, guidance head "none" -> feature guidance cost is the same
# forward; the KL path uses a random 1000-class linear head written here) at 224 px, batch 32, bf16, random weights
VIT="model.backbone=dinov2_vitb14 model.weights=none model.channels_last=false data.image_size=224 data.batch_size=32 train.precision=bf16 data.num_train=2000 data.num_workers=4 optim.optimizer=adamw"
timeout 200 $PY - "$OUT" $VIT <<'PYEOF'
import json, sys, torch
sys.path.insert(0, "benchmarks")
from bench_trainer import trainer_step_time
out, common = sys.argv[1], sys.argv[2:]
head = f"{out}/dinov2_vitb14_linear_head.pth"
torch.save({"weight": torch.randn(1000, 1536) * 0.02, "bias": torch.zeros(1000)}, head)
variants = {
    "dinov2_b14_erm": ("digits_erm", ["model.guidance_head=none"]),
    "dinov2_b14_asg": ("digits_asg", ["method.teacher_cache=false", "model.guidance_head=dinov2_linear",
                                      f"model.guidance_file={head}"]),
}
res = {k: trainer_step_time(r, common + o, "cuda", steps=30, warmup=5) for k, (r, o) in variants.items()}
erm = res["dinov2_b14_erm"]
for k, v in res.items():
    print(f"{k:<20} {1000 * v['step_s_median']:8.1f} ms/step  peak {v['peak_mem_mib']:8.0f} MiB  "
          f"x{v['step_s_median'] / erm['step_s_median']:.3f}")
json.dump(res, open(f"{out}/gpu_results_dinov2.json", "w"), indent=1)
PYEOF
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
SETS=""
for kv in $COMMON; do SETS="$SETS --set $kv"; done
for N in 1 "$NGPU"; do
  START=$(date +%s.%N)
  timeout 60 torchrun --standalone --nproc-per-node "$N" -m asg train --config digits_asg --out "/tmp/ddp_$N" \
    $SETS --set train.steps=60 --set train.eval_every=100000 --set train.checkpoint_every=100000 \
    --set eval.retention=false --set data.eval_max_per_set=64 --set train.progress=false > "$OUT/torchrun_$N.log" 2>&1
  echo "torchrun $N GPU(s): rc $? wall $(echo "$(date +%s.%N) - $START" | bc) s for 60 steps (global batch 32)"
done
