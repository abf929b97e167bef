"""The constrained step on conv nets with the factored rows (Linear factors + written-out conv rows, rows.py)
against the same step with the dense Jacobian (vmap(jacrev)), each as a ratio to an SGD step, in the same run.

    python bench/conv_rows.py            # LeNet-5 on 1x8x8, 1x28x28 and 3x32x32 inputs, this machine's CPU
"""
import argparse
import json

import geodesic.rows as rows
from geodesic.stepcost import step_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    factored_layers = rows.factored_layers
    out = []
    for shape in ((1, 8, 8), (1, 28, 28), (3, 32, 32)):
        row = {"model": "lenet5", "input": "x".join(map(str, shape))}
        for name, patch in (("factored", factored_layers), ("dense", lambda *a: None)):
            rows.factored_layers = patch  # dense: as before this change, for the comparison in the same run
            try:
                c = step_cost("lenet5", shape, 10, device=args.device, n_repeats=args.repeats, n_warmup=2)
            finally:
                rows.factored_layers = factored_layers
            row[name] = {"solver": c["constrained_linear_solver"], "sgd_ms": 1000 * c["sgd_seconds"],
                         "constrained_ms": 1000 * c["constrained_seconds"], "ratio": c["constrained_ratio"]}
        out.append(row)
        f, d = row["factored"], row["dense"]
        print(f"lenet5 {row['input']}: constrained/SGD factored {f['ratio']:.2f}x ({f['constrained_ms']:.1f} ms, "
              f"{f['solver']}) vs dense {d['ratio']:.2f}x ({d['constrained_ms']:.1f} ms, {d['solver']}); "
              f"SGD {f['sgd_ms']:.1f} / {d['sgd_ms']:.1f} ms", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
