"""MemoryBank: ring-buffer writes, payloads, persistence, storage dtypes, validation."""

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_lib.memory import MemoryBank


class RingReference:
    """Row-by-row ring buffer used as the reference for MemoryBank.enqueue."""

    def __init__(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        self.rows = rows.clone()
        self.labels = labels.clone()
        self.ptr = 0

    def write(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        for row, label in zip(x, labels, strict=True):
            self.rows[self.ptr] = row
            self.labels[self.ptr] = label
            self.ptr = (self.ptr + 1) % self.rows.shape[0]


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_init_state():
    bank = MemoryBank(64, 8, payloads=("labels", "clusters"))
    assert bank.embeddings.shape == (64, 8)
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(64))
    assert (bank.labels == -1).all() and (bank.clusters == -1).all()
    assert int(bank.ptr) == 0 and int(bank.num_seen) == 0
    same_seed = MemoryBank(64, 8, payloads=("labels", "clusters"))
    assert torch.equal(bank.embeddings, same_seed.embeddings)
    assert not torch.equal(bank.embeddings, MemoryBank(64, 8, seed=1).embeddings)
    assert (MemoryBank(16, 4, init="zeros").embeddings == 0).all()


@pytest.mark.parametrize(
    ("size", "batches"),
    [(16, [5, 5, 5, 5, 7]), (16, [3, 16, 1, 20]), (256, [300]), (256, [100, 300, 57]), (8, [8, 8])],
)
def test_wraparound_matches_reference(size, batches):
    bank = MemoryBank(size, 4)
    ref = RingReference(bank.embeddings, bank.labels)
    seen = 0
    for step, n in enumerate(batches):
        x = _unit(n, 4, step)
        labels = torch.arange(seen, seen + n)
        bank.enqueue(x, labels=labels)
        ref.write(x, labels)
        seen += n
        assert torch.equal(bank.embeddings, ref.rows)
        assert torch.equal(bank.labels, ref.labels)
        assert int(bank.ptr) == ref.ptr
        assert int(bank.num_seen) == seen


def test_batch_larger_than_bank_keeps_last_rows_in_ring_order():
    bank = MemoryBank(256, 4)
    x = _unit(300, 4, 0)
    bank.enqueue(x, labels=torch.arange(300))
    # Row i of the batch lands in slot i % 256; rows 44..299 survive.
    slots = torch.arange(44, 300) % 256
    assert torch.equal(bank.embeddings[slots], x[44:])
    assert torch.equal(bank.labels[slots], torch.arange(44, 300))
    assert int(bank.ptr) == 300 % 256


def test_payload_alignment_and_missing_payloads():
    bank = MemoryBank(10, 3, payloads=("labels", "index"))
    rows = _unit(23, 3, 1)
    for start in range(0, 23, 6):
        chunk = slice(start, min(start + 6, 23))
        ids = torch.arange(23)[chunk]
        bank.enqueue(rows[chunk], index=ids)
    filled = bank.index >= 0
    assert filled.all()
    assert torch.equal(bank.embeddings, rows[bank.index])
    assert (bank.labels == -1).all()
    bank.enqueue(rows[:2], labels=torch.tensor([4, 5]))
    slots = torch.tensor([3, 4])
    assert torch.equal(bank.labels[slots], torch.tensor([4, 5]))
    assert (bank.index[slots] == -1).all()


def test_enqueue_detaches_and_gather():
    bank = MemoryBank(8, 3)
    x = _unit(4, 3, 2).requires_grad_()
    bank.enqueue(x * 1.0)
    assert not bank.embeddings.requires_grad
    out = bank.gather(torch.tensor([[0, 1], [2, 3]]))
    assert out.shape == (2, 2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out.reshape(4, 3), x.detach())
    assert torch.equal(bank[torch.tensor([1])], out[0, 1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "fp16", "bf16"])
def test_low_precision_storage_with_fp32_math(dtype):
    bank = MemoryBank(500, 16, dtype=dtype, chunk_size=64)
    bank.enqueue(_unit(300, 16, 3))
    assert bank.embeddings.dtype in (torch.float16, torch.bfloat16)
    queries = _unit(7, 16, 4)
    sims, idx = bank.knn(queries, 5)
    assert sims.dtype == torch.float32 and idx.dtype == torch.int64
    stored = bank.embeddings.float().numpy()
    ref = queries.numpy().astype(np.float64) @ stored.T.astype(np.float64)
    ref_idx = np.argsort(-ref, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(ref, ref_idx, 1), rtol=0, atol=1e-5)
    assert np.array_equal(idx.numpy(), ref_idx)
    gathered = bank.gather(idx)
    assert gathered.dtype == torch.float32
    torch.testing.assert_close(gathered, bank.embeddings[idx].float())


def test_state_dict_round_trip():
    bank = MemoryBank(32, 6, payloads=("labels", "clusters"), dtype="bf16")
    bank.enqueue(_unit(45, 6, 5), labels=torch.arange(45), clusters=torch.arange(45) % 3)
    state = bank.state_dict()
    assert set(state) == {"embeddings", "labels", "clusters", "ptr", "num_seen"}
    fresh = MemoryBank(32, 6, payloads=("labels", "clusters"), dtype="bf16", seed=7)
    fresh.load_state_dict(state)
    for name, value in bank.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
        assert fresh.state_dict()[name].dtype == value.dtype
    fresh.reset()
    assert int(fresh.ptr) == 0 and (fresh.labels == -1).all()


class BankModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.bank = MemoryBank(24, 4, payloads=("labels",), dtype=torch.float16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = nn.functional.normalize(self.net(x), dim=1)
        self.bank.enqueue(z, labels=y)
        _, idx = self.bank.knn(z.detach(), 3)
        return (2 - 2 * (z.unsqueeze(1) * self.bank.gather(idx)).sum(-1)).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_checkpoint_round_trip(tmp_path: Path):
    pl.seed_everything(0)
    data = TensorDataset(torch.randn(40, 4), torch.arange(40))
    module = BankModule()
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=10))
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    restored = BankModule.load_from_checkpoint(ckpts[-1])
    assert int(module.bank.num_seen) == 20 and int(module.bank.ptr) == 20
    for name in ("embeddings", "labels", "ptr", "num_seen"):
        before, after = getattr(module.bank, name), getattr(restored.bank, name)
        assert after.dtype == before.dtype
        assert torch.equal(after, before), name
    assert torch.equal(restored.bank.labels[:20], torch.arange(20))


def test_validation_errors():
    bank = MemoryBank(16, 4, payloads=("labels",))
    q = _unit(2, 4, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 16\]"):
        bank.knn(q, 17)
    with pytest.raises(ValueError, match=r"k must be in \[1, 16\]"):
        bank.knn(q, 0)
    with pytest.raises(ValueError, match="expected dim 4.*shape \\(2, 5\\)"):
        bank.knn(_unit(2, 5, 0), 1)
    with pytest.raises(ValueError, match="expected dim 4"):
        bank.enqueue(_unit(2, 3, 0))
    with pytest.raises(ValueError, match="unknown payload 'clusters'; accepted: labels"):
        bank.enqueue(q, clusters=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown payload 'nope'"):
        bank.payload("nope")
    with pytest.raises(ValueError, match=r"payload 'labels' must have shape \(2,\)"):
        bank.enqueue(q, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; accepted: float32, fp32"):
        MemoryBank(4, 2, dtype="fp8")
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        MemoryBank(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown backend 'annoy'; accepted: auto, torch, faiss"):
        MemoryBank(4, 2, backend="annoy")
    with pytest.raises(ValueError, match="unknown init"):
        MemoryBank(4, 2, init="uniform")
    with pytest.raises(ValueError, match="payload names"):
        MemoryBank(4, 2, payloads=("ptr",))
    with pytest.raises(ValueError, match="negative indices"):
        bank.gather(torch.tensor([0, -1]))


def test_extra_repr():
    text = repr(MemoryBank(16, 4, payloads=("labels", "clusters"), dtype="fp16"))
    for part in ("size=16", "dim=4", "torch.float16", "'labels', 'clusters'", "backend='auto'"):
        assert part in text
