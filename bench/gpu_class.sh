#!/usr/bin/env bash
# The class-server part of the GPU check (issue 9), short enough to rerun in one lease: the CUDA tests, where a
# batched step's time goes (bench/batch_profile.py, lone walk and 8/32 walks, profiled at 32), and the load
# benchmark on the GPU (1, 8, 32 sessions, both step rules) with this machine's CPU lone walk beside it.
# Usage: bash bench/gpu_class.sh OUTDIR     (PYTHON=... picks the interpreter; DEVICE=cpu rehearses it)
set -u
out=${1:-artifacts/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 GEODESIC_CACHE=${GEODESIC_CACHE:-$(mktemp -d)}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  $py -c "import torch, os; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cpus', os.cpu_count())"
} 2>&1 | tee "$out/gpu.txt"
$py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -8 | tee "$out/pytest-cuda.txt"
$py bench/batch_profile.py --device "$device" --walks 1,8,32 --steps 20 --profile 32 2>&1 \
  | grep -v -i "warn\|USDT" | tee "$out/batch-profile-$device.txt"
$py bench/batch_profile.py --device cpu --walks 1 --steps 20 2>&1 | grep '^{' | tee "$out/batch-profile-cpu.txt"
$py bench/load.py --device "$device" --walks 1,8,32 --goals sparsify --seconds 5 \
  --json "$out/load-$device.json" 2>&1 | grep -v -i warn | tee "$out/load-$device.txt"
$py bench/load.py --device cpu --walks 1 --goals sparsify --seconds 5 2>&1 | grep -v -i warn | tee "$out/load-cpu.txt"
