#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README, "GPU checks"): CUDA benchmark, L2O meta-training on the
# synthetic digits, and the L2O comparison of the demo over 5 seeds. Each stage has its own time guard.
# Expects wheels for the packages that machine lacks in .whl/ and writes what comes back under $OUT.
set -u
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=$PWD/.gpucache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.get_device_name(0))"
nproc
W="train.device=${DEV:-cuda}"
timeout ${BENCH_S:-60} python3 benchmarks/run.py ${DEV:-cuda} && cp benchmarks/results.json $OUT/bench_cuda.json
EPISODES=${EPISODES:-40}
timeout ${META_S:-300} python3 -m asg.cli l2o train --config digits_l2o_meta --out /tmp/meta --set $W \
  --set data.num_workers=4 --set train.progress=false --set l2o.episodes=$EPISODES
ls /tmp/meta /tmp/meta/policies | tail -3
POLICY=/tmp/meta/policy.safetensors
[ -f $POLICY ] || POLICY=$(ls /tmp/meta/policies/*.safetensors | tail -1)
echo "policy used: $POLICY"
mkdir -p src/asg/resources/policies && cp $POLICY src/asg/resources/policies/digits_lite0.safetensors
cp $POLICY $OUT/policy.safetensors; cp /tmp/meta/meta_history.jsonl $OUT/; cp /tmp/meta/*.png $OUT/ 2>/dev/null
timeout ${DEMO_S:-200} python3 -m asg.cli demo --out /tmp/demo --seeds 5 --methods asg,asg+l2o,asg+random \
  --set $W --set data.num_workers=4 --set train.progress=false
cp /tmp/demo/report.json $OUT/demo_report.json; cp /tmp/demo/report.md $OUT/demo_report.md
echo finished
