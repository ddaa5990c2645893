#!/usr/bin/env bash
# The one prepared device call: the fast paths' self-checks (dfc-ray doctor), the training-step table and group ratios (issue 19), then the judges,
# harvest and costs file (issue 20). Each part has its own time limit, so one that hangs leaves the
# other's figures; everything lands in $OUT (the device tool brings it back) or runs/gpu-check.
#
#   bash benchmarks/gpu_check.sh           # on the H200 (at most 4 + 4.5 minutes)
#   TOY=1 bash benchmarks/gpu_check.sh     # the same script on a laptop's CPU at toy shapes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
toy=(--d-model 2048) jtoy=() groups=1,4,8,16  # the issue's table is at d_model 2048
if [ -n "${TOY:-}" ]; then toy=(--toy --device cpu --dtype fp32) jtoy=(--toy --device cpu) groups=1,2; fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi"; python3 -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/machine.txt"
# the fast paths' first-contact self-checks and the path each stage takes (dfc-ray doctor, without Ray)
timeout 120 python3 -m dfc_ray.doctor 2>&1 | tee "$OUT/doctor.txt"
echo "doctor exit: ${PIPESTATUS[0]}"
timeout 240 python3 benchmarks/train_throughput.py --table --group "$groups" --recovery-steps 600 --json "$OUT/train.json" "${toy[@]}" \
    2>&1 | tee "$OUT/train.log"
echo "train_throughput exit: ${PIPESTATUS[0]}"
timeout 270 python3 benchmarks/gpu_judges.py --out "$OUT" "${jtoy[@]}" 2>&1 | tee "$OUT/judges.log"
echo "gpu_judges exit: ${PIPESTATUS[0]}"
