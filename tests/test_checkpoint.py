"""Weights load without running code from the file; mismatches name the tensor; big files are refused."""
import pickle

import pytest
import torch

from geodesic.checkpoint import match_params, read_tensors, save_weights
from geodesic.errors import CheckpointError


class _WritesAFile:
    """Unpickling this would create a file: the attack a code-carrying checkpoint makes."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_carrying_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _WritesAFile(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_tensors(path)
    assert not marker.exists()


def test_state_dict_and_safetensors_round_trip(tmp_path):
    params = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    torch.save(params, tmp_path / "w.pt")
    save_weights(params, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        loaded, _ = match_params(read_tensors(tmp_path / name), params)
        assert all(torch.equal(loaded[k], params[k]) for k in params)


def test_mismatches_name_the_first_bad_tensor(tmp_path):
    like = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"'a.weight' has shape \(2, 2\), the model expects \(3, 2\)"):
        match_params({"a.weight": torch.zeros(2, 2), "a.bias": torch.zeros(3)}, like)
    with pytest.raises(CheckpointError, match="missing tensor 'a.bias'"):
        match_params({"a.weight": torch.zeros(3, 2)}, like)
    with pytest.raises(CheckpointError, match="unexpected tensor 'b.weight'"):
        match_params({"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3), "b.weight": torch.zeros(1)}, like)


def test_weights_with_nan_or_infinite_values_are_refused_before_anything_is_replaced():
    """An upload of NaN weights started a walk that could only diverge, in place of the user's walk."""
    like = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    bad = torch.zeros(3, 2, dtype=torch.float64)
    bad[0, 0], bad[2, 1] = float("nan"), float("inf")
    with pytest.raises(CheckpointError, match="'a.weight' holds 2 NaN or infinite values \\(of 6\\)"):
        match_params({"a.weight": bad, "a.bias": torch.zeros(3)}, like)
    with pytest.raises(CheckpointError, match="'running_mean' holds 1 NaN or infinite value \\(of 3\\)"):
        match_params({**like, "running_mean": torch.tensor([0.0, float("-inf"), 1.0])}, like,
                     buffers={"running_mean": torch.zeros(3)})


def test_truncated_and_oversized_files_are_refused(tmp_path):
    save_weights({"w": torch.randn(100)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        read_tensors(tmp_path / "cut.safetensors")
    torch.save({"w": torch.randn(100)}, tmp_path / "w.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="refused to load"):
        read_tensors(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="over the"):
        read_tensors(tmp_path / "w.safetensors", max_bytes=10)
    with pytest.raises(CheckpointError, match="no such file"):
        read_tensors(tmp_path / "absent.pt")


def test_a_file_that_is_no_weights_file_is_named_so_and_safetensors_are_known_by_their_header(tmp_path):
    (tmp_path / "notes.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("notes.pt", "empty.pth"):
        with pytest.raises(CheckpointError, match="not a weights file: neither .safetensors nor a PyTorch checkpoint"):
            read_tensors(tmp_path / name)
    save_weights({"w": torch.arange(3.0)}, tmp_path / "w.safetensors")
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.safetensors").read_bytes())  # renamed by a user
    assert torch.equal(read_tensors(tmp_path / "w.bin")["w"], torch.arange(3.0))


def test_messages_name_an_upload_by_its_own_name_not_the_temporary_path(tmp_path):
    """The Runs page writes an upload to a temporary file; its messages must name the file the user chose."""
    (tmp_path / "upload.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"^my-net\.safetensors: not a readable") as err:
        read_tensors(tmp_path / "upload.safetensors", name="my-net.safetensors")
    assert str(tmp_path) not in str(err.value)
    with open(tmp_path / "upload.pt", "wb") as f:
        pickle.dump({"w": _WritesAFile(str(tmp_path / "pwned.txt"))}, f)
    with pytest.raises(CheckpointError, match=r"^evil\.pt: refused to load"):
        read_tensors(tmp_path / "upload.pt", name="evil.pt")
    assert not (tmp_path / "pwned.txt").exists()
