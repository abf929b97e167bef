"""Which code made a run: geodesic's version, the git commit of a checkout, and the Python and PyTorch versions.

`python -m geodesic --version` prints them (what a bug report needs), and every summary.json records them under
"versions", so a run opened months later says which code and which PyTorch walked it."""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

__version__ = "0.1.0"

_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def commit() -> str | None:
    """The checkout's commit (12 hex digits, '+changes' when tracked files differ from it); None outside a git
    checkout or without git. Asked once per process: a walk's summary must not wait on git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "--show-toplevel", "--short=12", "HEAD")
        lines = head.stdout.split()
        # this package's own checkout, not one it was copied into (Ray ships it to a folder of its own)
        if head.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != _ROOT:
            return None
        changed = git("diff", "--quiet", "HEAD", "--").returncode == 1  # untracked files (runs/, .venv) ignored
        return lines[1] + ("+changes" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch

    return {"geodesic": __version__, "commit": commit(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def describe() -> str:
    """One line, e.g. 'geodesic 0.1.0 (commit 79ff8e4a1b2c), Python 3.11.7, torch 2.14.1+cu130 (CUDA 13.0, no GPU
    visible)'."""
    import torch

    v = versions()
    at = f" (commit {v['commit']})" if v["commit"] else ""
    if not v["cuda"]:
        build = "CPU build"
    elif torch.cuda.is_available():
        build = f"CUDA {v['cuda']}, {torch.cuda.get_device_name(0)}"
    else:
        build = f"CUDA {v['cuda']}, no GPU visible"
    return f"geodesic {v['geodesic']}{at}, Python {v['python']}, torch {v['torch']} ({build})"
