#!/usr/bin/env bash
# The GPU targets still open (issues 9, 11 and 12), in one device call of about 8 minutes: a lease is 15 minutes
# of device time in all, start-up included, so this leaves room for one rerun. Each part is capped with `timeout`
# and writes to OUTDIR/targets.log (and its own files), so a part that hangs or fails costs only itself.
#   1. the CUDA tests (the graph tests among them: does cuSOLVER's Cholesky record into a CUDA graph?);
#   2. the step cost of every model, with a walk's whole step (replayed as a CUDA graph for the MLP and LeNet-5)
#      against SGD: issue 12's 4x and 1.5x;
#   3. batches of 1, 8 and 32 walks, graphs and GEODESIC_CUDA_GRAPHS=off in the same run, and issue 11's fan of 8
#      (new-task, constrained) against one walk;
#   4. 32 walks through the engine, all goals and rules, and one lone walk on the GPU and on this machine's CPU:
#      issue 9's 20 steps/s each and "a lone GPU walk at least as fast as the CPU".
# Usage: bash bench/gpu_targets.sh OUTDIR   (PYTHON=... picks the interpreter; DEVICE=cpu rehearses it)
set -u
out=${1:-artifacts/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 GEODESIC_CACHE=${GEODESIC_CACHE:-$(mktemp -d)}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/.carry"  # mlxtend, carried (see bench/gpu_check.sh)
part() { echo "== $1 ($(date +%T))"; }
{
  part "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  $py -c "import torch, os; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cpus', os.cpu_count())"
  part "CUDA tests"
  timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15
  part "step cost (issue 12), a walk's whole step graphed for the small models"
  timeout 150 $py -m geodesic.bench --device "$device" --step-cost-only --json "$out/stepcost.json" \
    --markdown "$out/stepcost.md" 2>&1 | grep -v -i warn | tail -3
  cat "$out/stepcost.md" 2>/dev/null
  part "batches with graphs (default) and without"
  timeout 60 $py bench/batch_profile.py --device "$device" --walks 1,8,32 --steps 20 2>&1 | grep '^{'
  GEODESIC_CUDA_GRAPHS=off timeout 60 $py bench/batch_profile.py --device "$device" --walks 1,8,32 --steps 20 2>&1 \
    | grep '^{'
  part "issue 11's fan of 8 (new-task constrained) against one walk, graphs and not"
  timeout 40 $py bench/batch_profile.py --device "$device" --goal new-task --solvers constrained --walks 1,8 \
    --steps 20 2>&1 | grep '^{'
  GEODESIC_CUDA_GRAPHS=off timeout 40 $py bench/batch_profile.py --device "$device" --goal new-task \
    --solvers constrained --walks 1,8 --steps 20 2>&1 | grep '^{'
  part "issue 9: 1 and 32 walks through the engine, and the lone walk on the CPU"
  timeout 120 $py bench/load.py --device "$device" --walks 1,32 --goals sparsify,new-task,connect --seconds 3 \
    --json "$out/load-$device.json" 2>&1 | grep '^{'
  timeout 30 $py bench/load.py --device cpu --walks 1 --goals sparsify --seconds 3 2>&1 | grep '^{'
  part "done"
} 2>&1 | tee "$out/targets.log"
