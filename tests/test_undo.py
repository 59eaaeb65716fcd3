"""The undo protocol of the non-finite skip mode: journals found by type, copies of the rest."""

from __future__ import annotations

import torch
from torch import nn

from ssl_lib.memory import MemoryBank
from ssl_lib.memory.cache import SampleCache
from ssl_lib.undo import StepUndo, Undoable


class Counting(nn.Module, Undoable):
    """An Undoable that records the calls it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.register_buffer("rows", torch.zeros(3))

    def record_undo(self) -> None:
        self.calls.append("record")

    def stop_undo(self, revert: bool) -> None:
        self.calls.append(f"stop revert={revert}")


class LooksUndoable(nn.Module):
    """Has the methods but does not declare the protocol: it is copied like any module."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.register_buffer("rows", torch.zeros(3))

    def record_undo(self) -> None:
        self.calls.append("record")

    def stop_undo(self, revert: bool) -> None:
        self.calls.append("stop")


class Step(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.target = nn.Linear(4, 4).requires_grad_(False)
        self.bank = MemoryBank(8, 4)
        self.cache = SampleCache(10, 4, slots=2)
        self.counting = Counting()
        self.looks = LooksUndoable()

    def write(self) -> None:
        """Everything a training step may change outside the optimiser."""
        self.net.train()(torch.randn(5, 4))  # BatchNorm statistics
        with torch.no_grad():
            self.target.weight.mul_(0.5)  # an EMA update
        self.bank.enqueue(torch.randn(11, 4), labels=torch.arange(11))  # wraps around
        self.cache.write(torch.tensor([1, 7]), torch.randn(2, 4))
        self.counting.rows.add_(1.0)  # journaled by its owner (here: not at all)
        self.looks.rows.add_(1.0)


def snapshot(module: Step) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in module.state_dict().items():
        parts = value.items() if isinstance(value, dict) else [("", value)]
        state |= {f"{key}.{p}": t.clone() for p, t in parts}
    return state


def test_revert_restores_everything_and_commit_keeps_it():
    torch.manual_seed(0)
    module = Step()
    undo = StepUndo(module, frozen=[module.target])
    before = snapshot(module)
    undo.begin()
    module.write()
    undo.end(revert=True)
    after = snapshot(module)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["counting.rows."]  # its own journal is responsible for it
    undo.begin()
    module.write()
    undo.end(revert=False)
    kept = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], kept[k])}
    expected = {"net.1.running_mean.", "target.weight.", "bank.embeddings.", "bank.ptr."}
    assert expected <= changed and "cache._extra_state.data" in changed


def test_journals_are_found_by_the_protocol_not_by_method_names():
    module = Step()
    undo = StepUndo(module)
    undo.begin()
    undo.end(revert=True)
    assert module.counting.calls == ["record", "stop revert=True"]
    assert module.looks.calls == []  # copied instead: its buffer was restored above
    assert isinstance(module.bank, Undoable) and isinstance(module.cache, Undoable)
