import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ssl_lib.eval import features
from ssl_lib.eval.features import FeatureCache, _dedup_by_index, extract_features


class IndexedData(Dataset):
    """Returns ``(image, label, index)`` like the library's evaluation datasets."""

    def __init__(self, n: int = 23, dim: int = 6):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4))
    bn = model[1]
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    return model


def expected(data: IndexedData, normalize: bool = True) -> torch.Tensor:
    """Eval-mode output of a fresh model on the whole dataset."""
    model = make_model().eval()
    with torch.no_grad():
        out = model(data.x)
    return nn.functional.normalize(out, dim=1) if normalize else out


def test_extract_uses_eval_mode_sorts_and_restores_flags():
    data = IndexedData()
    model = make_model()
    model.train()
    model[3].eval()  # a submodule frozen by the caller must stay frozen
    shuffle = torch.Generator().manual_seed(1)
    loader = DataLoader(data, batch_size=5, shuffle=True, generator=shuffle)
    feats, labels, indices = extract_features(model, loader, device="cpu", progress=False)
    assert torch.equal(indices, torch.arange(23))
    assert torch.equal(labels, data.y)
    torch.testing.assert_close(feats, expected(data))
    # The train-mode output (batch statistics) is really different, so eval mode was used.
    with torch.no_grad():
        train_out = nn.functional.normalize(make_model().train()(data.x), dim=1)
    assert not torch.allclose(train_out, feats, atol=1e-3)
    assert model.training and model[1].training and not model[3].training
    assert float(model[1].running_mean[0]) == 0.5  # running statistics untouched
    feats.mul_(2)  # ordinary tensors, not inference tensors


def test_extract_fp16_and_unnormalised():
    data = IndexedData()
    model = make_model()
    loader = DataLoader(data, batch_size=4)
    half, _, _ = extract_features(model, loader, device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected(data), atol=1e-3, rtol=1e-3)
    raw, _, _ = extract_features(model, loader, device="cpu", normalize=False, progress=False)
    torch.testing.assert_close(raw, expected(data, normalize=False))
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [], device="cpu", progress=False)


def test_dedup_by_index_keeps_one_row_per_index():
    indices = torch.tensor([4, 1, 3, 1, 0, 4, 2, 0])
    feats = indices[:, None].float().repeat(1, 3)
    labels = indices * 10
    f, y, i = _dedup_by_index(feats, labels, indices)
    assert torch.equal(i, torch.arange(5))
    assert torch.equal(y, torch.arange(5) * 10)
    assert torch.equal(f, torch.arange(5)[:, None].float().repeat(1, 3))


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        features._GATHER_ROWS = 4  # several gather rounds, with ranks holding unequal rows
        data = IndexedData()
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(data, batch_size=3, sampler=sampler)
        result = extract_features(
            make_model(), loader, device="cpu", dtype=torch.float16, progress=False
        )
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_extraction_gathers_and_deduplicates(tmp_path):
    # 23 samples on 3 ranks: DistributedSampler pads to 24 by repeating one sample.
    world = 3
    mp.spawn(_distributed_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    data = IndexedData()
    for rank in range(world):
        feats, labels, indices = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(indices, torch.arange(23))
        assert torch.equal(labels, data.y)
        assert feats.dtype == torch.float16
        torch.testing.assert_close(feats.float(), expected(data), atol=1e-3, rtol=0)


def test_feature_cache_round_trip_and_keys(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights-v1" * 1000)
    cache = FeatureCache(tmp_path / "cache")
    key = cache.key(ckpt, "cifar10/train", "resize32-center", {"layer": "backbone"})
    assert key == cache.key(ckpt, "cifar10/train", "resize32-center", {"layer": "backbone"})
    assert cache.load(key) is None
    feats, labels, indices = torch.randn(7, 3).half(), torch.arange(7), torch.arange(7) + 10
    path = cache.save(key, feats, labels, indices)
    assert path.exists() and path.parent == cache.root
    loaded = cache.load(key)
    for a, b in zip(loaded, (feats, labels, indices), strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert [p.name for p in cache.root.iterdir()] == [path.name]  # no temporary left behind

    others = {
        cache.key(ckpt, "cifar10/test", "resize32-center", {"layer": "backbone"}),
        cache.key(ckpt, "cifar10/train", "resize36-center", {"layer": "backbone"}),
        cache.key(ckpt, "cifar10/train", "resize32-center", {"layer": "projector"}),
    }
    assert key not in others and len(others) == 3
    stat = ckpt.stat()
    ckpt.write_bytes(b"weights-v2" * 1000)  # same size, new content
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert cache.key(ckpt, "cifar10/train", "resize32-center", {"layer": "backbone"}) != key


def test_feature_cache_save_is_atomic(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    key = "ab" * 32
    cache.save(key, torch.zeros(2, 2), torch.zeros(2), torch.arange(2))

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.save(key, torch.ones(2, 2), torch.ones(2), torch.arange(2))
    monkeypatch.undo()
    assert torch.equal(cache.load(key)[0], torch.zeros(2, 2))  # the old entry is intact
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [f"{key}.pt"]
    with pytest.raises(ValueError, match="not a cache key"):
        cache.load("../escape")
