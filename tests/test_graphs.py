"""graphs.py: what a CUDA graph's caller relies on (static input buffers, outputs overwritten by the next call,
inputs checked against the recorded ones), checked with a plain call in place of the replay; the recording itself
is tested on a GPU (tests/test_cuda.py)."""
import pytest
import torch

from geodesic import graphs


def _fn(inputs):
    return {"sum": inputs["a"] + inputs["b"][0], "scaled": inputs["a"] * inputs["b"][1]}


def test_each_call_reads_its_own_inputs_through_the_static_buffers():
    a, b = torch.ones(3), (torch.full((3,), 2.0), torch.tensor(3.0))
    captured = graphs.Captured(_fn, {"a": a, "b": b}, record=False)
    out = captured({"a": a, "b": b})
    torch.testing.assert_close(out["sum"], torch.full((3,), 3.0))
    a.fill_(10.0)  # the caller's tensors are copied in, not aliased: changing them later changes nothing
    assert out["sum"][0] == 3.0
    again = captured({"a": torch.zeros(3), "b": (torch.ones(3), torch.tensor(-1.0))})
    assert again["sum"] is out["sum"]  # a graph has one set of outputs: the next call overwrites them
    torch.testing.assert_close(out["sum"], torch.ones(3))
    torch.testing.assert_close(out["scaled"], torch.zeros(3))


def test_inputs_shaped_otherwise_are_refused():
    captured = graphs.Captured(_fn, {"a": torch.ones(3), "b": (torch.ones(3), torch.tensor(1.0))}, record=False)
    assert not captured.matches({"a": torch.ones(4), "b": (torch.ones(4), torch.tensor(1.0))})
    with pytest.raises(ValueError, match="shape"):
        captured({"a": torch.ones(4), "b": (torch.ones(4), torch.tensor(1.0))})
    with pytest.raises(ValueError, match="structure"):
        captured({"a": torch.ones(3), "b": (torch.ones(3), torch.tensor(1.0, dtype=torch.float64))})


def test_graphs_are_wanted_for_small_models_on_a_gpu_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not graphs.wanted(cpu, 1000)
    assert graphs.wanted(cuda, 26_122) and not graphs.wanted(cuda, 9_225_610)  # auto: the MLP, not VGG11
    monkeypatch.setattr(graphs, "MODE", "on")
    assert graphs.wanted(cuda, 9_225_610)
    monkeypatch.setattr(graphs, "MODE", "off")
    assert not graphs.wanted(cuda, 26_122)

def test_a_bad_setting_is_named_once_and_auto_is_used(monkeypatch, capsys):
    cuda = torch.device("cuda")
    monkeypatch.setattr(graphs, "MODE", "sometimes")
    monkeypatch.setattr(graphs, "_REPORTED", set())
    assert graphs.wanted(cuda, 26_122) and not graphs.wanted(cuda, 9_225_610)
    err = capsys.readouterr().err
    assert err.count("GEODESIC_CUDA_GRAPHS='sometimes' is not auto, on or off; auto is used") == 1


def test_at_most_max_live_graphs_live_and_an_idle_one_makes_room(monkeypatch):
    monkeypatch.setattr(graphs, "MAX_LIVE", 2)
    monkeypatch.setattr(graphs, "_LIVE", {})
    example = {"a": torch.ones(3), "b": (torch.ones(3), torch.tensor(1.0))}
    first, second = (graphs.Captured(_fn, example, record=False) for _ in range(2))
    graphs._register(first)
    graphs._register(second)
    with pytest.raises(graphs.NoRoom):  # both were used just now
        graphs._make_room()
    first.last_used -= graphs.IDLE_SECONDS
    graphs._make_room()  # the idle one goes, with its memory
    assert first.released and not second.released and len(graphs._LIVE) == 1
    with pytest.raises(graphs.Released):
        first(example)
    torch.testing.assert_close(second(example)["sum"], torch.full((3,), 2.0))
    del second  # a graph nobody holds (its batch was dropped) leaves the registry by itself
    import gc

    gc.collect()
    assert graphs._LIVE == {}


def test_graphs_called_from_many_threads_at_once_keep_their_own_inputs_and_outputs(monkeypatch):
    """Sessions' threads (the Python API; the server steps on one engine thread) each replaying their own graph
    while the registry makes room: every call returns its own inputs' result, nothing raises."""
    import threading

    monkeypatch.setattr(graphs, "_LIVE", {})
    errors, n_threads = [], 8

    def session(i: int) -> None:
        try:
            example = {"a": torch.full((64,), float(i)), "b": (torch.ones(64), torch.tensor(2.0))}
            captured = graphs.Captured(_fn, example, record=False)
            graphs._register(captured)
            for j in range(200):
                out = captured({"a": torch.full((64,), float(i + j)), "b": (torch.ones(64), torch.tensor(2.0))})
                assert float(out["sum"][0]) == i + j + 1 and float(out["scaled"][-1]) == 2 * (i + j)
                if j % 50 == 0:
                    with graphs._LOCK:
                        try:
                            graphs._make_room()
                        except graphs.NoRoom:
                            pass
        except Exception as err:  # noqa: BLE001 - collected and failed below
            errors.append(err)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
