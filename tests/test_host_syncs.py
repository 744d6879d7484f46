"""The packed preference step reads nothing back from the device: host synchronisations per step.

On a GPU, every ``.item()``, ``.tolist()``, ``int(tensor)``, ``.nonzero()`` or boolean-mask index
waits for the queued kernels to finish; a step that does them per chain or per padding token is
launch-bound however fast the kernels are. This machine has no GPU, so the test counts the calls
that would synchronise (patched on ``torch.Tensor`` for one forward and backward) instead of
timing them. The collator builds the tree layout and the gather plan on the host, so the count is
zero, at batch 1 (no padding) as at batch 3 (rows padded to the longest).
"""

import pytest
import torch

from llava.method import CONDITION_NAMES
from llava.model.forward import response_logps
from tests.test_packing import setup

READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__int__", "__float__", "__bool__", "__index__")


class SyncCounter:
    """Counts calls that copy a device value to the host, by name, while installed."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        for name in READS:
            self._wrap(monkeypatch, torch.Tensor, name)
        self._wrap(monkeypatch, torch, "nonzero")
        self._wrap(monkeypatch, torch, "masked_select")
        getitem = torch.Tensor.__getitem__

        def indexed(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts):
                self.calls["boolean index"] = self.calls.get("boolean index", 0) + 1  # needs the count of True
            return getitem(t, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", indexed)

    def _wrap(self, monkeypatch, owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def syncs_of_one_step(model, batch, monkeypatch) -> dict[str, int]:
    with monkeypatch.context() as m:
        counter = SyncCounter(m)
        logps = response_logps(model, batch)
        logps.sum().backward()
    return counter.calls


def test_the_counter_sees_reads(monkeypatch):
    with monkeypatch.context() as m:
        counter = SyncCounter(m)
        t = torch.arange(4)
        t[t > 1], int(t[0]), t.tolist(), bool(t.sum())
    assert counter.calls == {"boolean index": 1, "__int__": 1, "tolist": 1, "__bool__": 1}


@pytest.mark.parametrize("records", [1, 3])
def test_no_host_sync_in_the_packed_step(records, tiny_llava_dir, preference_file, monkeypatch):
    model, packed, _ = setup(tiny_llava_dir, preference_file, "pad", CONDITION_NAMES, records)
    model.train()
    layout = packed["tree"]
    if records > 1:  # rows of different lengths: padding chains present
        assert any(c.identity for _, _, chains in layout.groups for c in chains)
    calls = syncs_of_one_step(model, packed, monkeypatch)
    assert calls == {}, calls
    assert all(p.grad is not None for p in model.lm_head.parameters())  # the step did run backward
