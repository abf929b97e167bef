#!/usr/bin/env bash
# The engine issue's acceptance runs: three goals x two step rules x seeds, on digits, CPU.
# Usage: bash bench/acceptance.sh OUTDIR [SEEDS...]   (prints one line per run; summaries under OUTDIR)
set -u
out=${1:-artifacts/acceptance}; shift || true
mkdir -p "$out"
seeds=${*:-0}
py=${PYTHON:-.venv/bin/python}
for seed in $seeds; do
  for solver in constrained penalty; do
    for goal in "sparsify --target-sparsity 0.9" "new-task --new-task permuted" "connect"; do
      name=$(echo "$goal" | cut -d' ' -f1)
      dir="$out/$name-$solver-seed$seed"
      rm -rf "$dir"  # a rerun replaces the last result (geodesic run refuses to write over a saved run)
      /usr/bin/time -f "%e" -o "$dir.time" $py -m geodesic run --goal $goal --dataset digits --solver $solver \
        --seed "$seed" --device cpu --out "$dir" --quiet 2>"$dir.err" || echo "FAILED $dir: $(tail -1 "$dir.err")"
      $py - "$dir" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1]); s = json.loads((d / "summary.json").read_text())
wall = float(pathlib.Path(str(d) + ".time").read_text().split()[-1])
acc = lambda p: " ".join(f"{k}={100*v:.2f}" for k, v in p.items())
extra = f" barrier={100*s['error_barrier']:.2f} line={100*s['linear_error_barrier']:.2f}" if "error_barrier" in s else ""
print(f"{d.name}: steps={s['steps']} reached={s['reached_goal']} start[{acc(s['start']['test_accuracy'])}] "
      f"end[{acc(s['end']['test_accuracy'])}] min[{acc(s['min_test_accuracy'])}] sparsity={s['end']['sparsity']:.3f}"
      f"{extra} step_ms={1000*s['step_seconds_mean']:.1f} wall_s={wall:.1f}")
PY
    done
  done
done
