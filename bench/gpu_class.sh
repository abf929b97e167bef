#!/usr/bin/env bash
# The class-server part of the GPU check (issue 9), short enough to rerun in one lease: the CUDA tests, where a
# batched step's time goes (bench/batch_profile.py: lone walk, 8 and 32 walks, profiled at 32), and the load
# benchmark through the engine on the GPU (1, 8, 32 sessions, both step rules, all goals) with this machine's CPU
# lone walk beside it. Everything goes to OUTDIR/class.log, the load tables also to OUTDIR/load-*.json.
# Usage: bash bench/gpu_class.sh OUTDIR     (PYTHON=... picks the interpreter; DEVICE=cpu rehearses it;
#        THREADS=N sets the engine's CPU threads, default half the cores)
set -u
out=${1:-artifacts/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
threads=${THREADS:-0}
export PYTHONUNBUFFERED=1 GEODESIC_CACHE=${GEODESIC_CACHE:-$(mktemp -d)}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  $py -c "import torch, os; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cpus', os.cpu_count())"
  $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_batch.py 2>&1 | tail -2
  echo "== batch_profile $device (steps replayed as CUDA graphs, graphs.py 'auto')"
  $py bench/batch_profile.py --device "$device" --walks 1,8,32 --steps 20 --profile 32 2>&1 | grep -v -i "warn\|USDT"
  echo "== batch_profile $device without graphs (GEODESIC_CUDA_GRAPHS=off: every kernel launched from Python)"
  GEODESIC_CUDA_GRAPHS=off $py bench/batch_profile.py --device "$device" --walks 1,8,32 --steps 20 2>&1 | grep '^{'
  echo "== batch_profile $device, new-task constrained (issue 11's fan of 8 against one walk), graphs and not"
  $py bench/batch_profile.py --device "$device" --goal new-task --solvers constrained --walks 1,8 --steps 20 2>&1 \
    | grep '^{'
  GEODESIC_CUDA_GRAPHS=off $py bench/batch_profile.py --device "$device" --goal new-task --solvers constrained \
    --walks 1,8 --steps 20 2>&1 | grep '^{'
  echo "== batch_profile cpu"
  $py bench/batch_profile.py --device cpu --walks 1,8,32 --steps 10 2>&1 | grep '^{'
  echo "== load $device"
  $py bench/load.py --device "$device" --threads "$threads" --walks 1,8,32 --goals sparsify --seconds 4 \
    --json "$out/load-$device.json" 2>&1 | grep -v -i warn
  $py bench/load.py --device "$device" --threads "$threads" --walks 8,32 --goals new-task,connect --seconds 4 \
    --json "$out/load-$device-goals.json" 2>&1 | grep -v -i warn
  echo "== load cpu"
  $py bench/load.py --device cpu --threads "$threads" --walks 1 --goals sparsify --seconds 4 2>&1 | grep -v -i warn
} 2>&1 | tee "$out/class.log"
