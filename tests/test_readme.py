"""The README's Python API example runs as written (on small random data in place of the user's tensors)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_api_example_in_the_readme_runs(capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g)
    y = (x[:, 0] > 0).long()
    scope = {"x_train": x[:200], "y_train": y[:200], "x_test": x[200:], "y_test": y[200:]}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102  (our own README)
    walker, walkers = scope["walker"], scope["walkers"]
    assert walker.is_done and walker.stop_reason == "goal reached"
    assert len(scope["frame"]) == walker.n_steps + 1
    before, after = scope["before"], scope["after"]
    assert len(before) == len(after) == 20 and after[10] == walker.record.last.accuracy["A"]  # 50%: where it ended
    assert all(w.is_done for w in walkers) and len({w.n_steps for w in walkers}) > 1  # ε changes the walk
    assert capsys.readouterr().out.count("\n") == walker.n_steps  # the loop printed every point
