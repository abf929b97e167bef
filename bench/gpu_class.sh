#!/usr/bin/env bash
# The class-server part of the GPU check (issue 9), short enough to rerun in one lease: the CUDA tests, where a
# batched step's time goes (bench/batch_profile.py, lone walk and 8/32 walks, profiled at 32), and the load
# benchmark on the GPU (1, 8, 32 sessions, both step rules, all goals) with this machine's CPU lone walk beside it.
# Usage: bash bench/gpu_class.sh OUTDIR     (PYTHON=... picks the interpreter; DEVICE=cpu rehearses it)
set -u
out=${1:-artifacts/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
threads=${THREADS:-0}
export PYTHONUNBUFFERED=1 GEODESIC_CACHE=${GEODESIC_CACHE:-$(mktemp -d)}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  $py -c "import torch, os; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cpus', os.cpu_count(),
'threads', torch.get_num_threads(), 'parallel', torch.__config__.parallel_info().splitlines()[:4])"
} 2>&1 | tee "$out/gpu.txt"
# Does torch.set_num_threads on a second thread (what the engine's worker does) return?
timeout 60 $py - <<'PY' 2>&1 | tee -a "$out/gpu.txt"
import faulthandler, threading, torch
faulthandler.dump_traceback_later(30, exit=True)
x = torch.randn(600, 600); float((x @ x).sum())
def worker():
    torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    y = torch.randn(600, 600)
    print("set_num_threads on a thread: ok", torch.get_num_threads(), float((y @ y).sum()) != 0, flush=True)
t = threading.Thread(target=worker); t.start(); t.join()
PY
$py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -3 | tee "$out/pytest-cuda.txt"
$py bench/batch_profile.py --device "$device" --walks 1,8,32 --steps 20 --profile 32 2>&1 \
  | grep -v -i "warn\|USDT" | tee "$out/batch-profile-$device.txt"
$py bench/batch_profile.py --device cpu --walks 1,8,32 --steps 10 2>&1 | grep '^{' | tee "$out/batch-profile-cpu.txt"
$py bench/load.py --device cpu --walks 1 --solvers penalty --seconds 3 2>&1 | grep -v -i warn | tee "$out/load-default-threads.txt"
$py bench/load.py --device "$device" --threads "$threads" --walks 1,8,32 --goals sparsify --seconds 4 \
  --json "$out/load-$device.json" 2>&1 | grep -v -i warn | tee "$out/load-$device.txt"
$py bench/load.py --device "$device" --threads "$threads" --walks 8,32 --goals new-task,connect --seconds 4 \
  --json "$out/load-$device-goals.json" 2>&1 | grep -v -i warn | tee "$out/load-$device-goals.txt"
$py bench/load.py --device cpu --threads "$threads" --walks 1 --goals sparsify --seconds 4 2>&1 | grep -v -i warn \
  | tee "$out/load-cpu.txt"
