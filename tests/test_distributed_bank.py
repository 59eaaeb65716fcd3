"""Bank replication and shuffle-BN helpers under a real 2-process gloo group."""

import importlib
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_lib import distributed as ddp
from ssl_lib.memory import MemoryBank
from ssl_lib.memory.search import faiss_available

WORLD = 2
SIZE, DIM, LOCAL_BATCH, STEPS = 40, 6, 7, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.nn.functional.normalize(torch.randn(LOCAL_BATCH, DIM, generator=g), dim=1)
    labels = torch.randint(0, 10, (LOCAL_BATCH,), generator=g)
    return x, labels


def _run(rank: int, port: int, out: str, body) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(body(rank), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _bank_body(rank: int) -> dict:
    assert ddp.is_dist() and ddp.world_size() == WORLD and ddp.rank() == rank
    bank = MemoryBank(SIZE, DIM, payloads=("labels", "index"), dtype="fp16")
    for step in range(STEPS):
        x, labels = _batch(step, rank)
        bank.enqueue(x, labels=labels)
    queries = _batch(99, rank)[0]
    _, idx = bank.knn(queries, 4)
    return {"state": bank.state_dict(), "knn": idx, "queries": queries}


def _shuffle_body(rank: int) -> dict:
    torch.manual_seed(rank)  # only rank 0's generator may decide the permutation
    x = (torch.arange(LOCAL_BATCH) + rank * LOCAL_BATCH).float().unsqueeze(1)
    shuffled, unshuffle_idx = ddp.shuffle_batch(x)
    restored = ddp.unshuffle_batch(shuffled * 10, unshuffle_idx)
    gathered = ddp.all_gather_concat(torch.full((2, 3), float(rank)))
    return {
        "x": x,
        "shuffled": shuffled,
        "unshuffle_idx": unshuffle_idx,
        "restored": restored,
        "gathered": gathered,
    }


def _choose_body(rank: int) -> dict:
    """Timings that disagree: alone, rank 0 would pick faiss and rank 1 torch."""
    search = importlib.import_module("ssl_lib.memory.search")
    search.AUTO_MIN_BLOCK_MACS = 0
    clock = [0.0]
    search.time = SimpleNamespace(perf_counter=lambda: clock[0])  # advanced by the slow kernel
    slow = "torch" if rank == 0 else "faiss"
    calls: list[str] = []
    for name, attr in (("torch", "_torch_kernel"), ("faiss", "_faiss_cpu_kernel")):
        kernel = getattr(search, attr)

        def run(*args, kernel=kernel, name=name):
            calls.append(name)
            clock[0] += 1.0 if name == slow else 0.0
            return kernel(*args)

        setattr(search, attr, run)
    bank = MemoryBank(SIZE, DIM, payloads=())
    queries = _batch(99, rank)[0]
    out = {"chosen": bank.choose_backend(LOCAL_BATCH, 3), "timing_calls": list(calls)}
    calls.clear()
    out["knn"] = bank.knn(queries, 3)[1]
    out["search_calls"] = list(calls)
    calls.clear()
    bank.knn(queries, 2)  # a case no choose_backend settled: torch, untimed, on every rank
    out["unsettled_calls"] = list(calls)
    if rank == 1:  # faiss cannot run here: every rank must use torch
        search._faiss_unusable = lambda device, k: "is unusable on rank 1"
    calls.clear()
    out["chosen_if_unusable"] = bank.choose_backend(LOCAL_BATCH, 4)
    out["timing_calls_if_unusable"] = list(calls)
    return out


def _spawn(tmp_path: Path, body) -> list[dict]:
    mp.spawn(_run, args=(_free_port(), str(tmp_path), body), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_ranks_hold_identical_bank_equal_to_single_process(tmp_path: Path):
    results = _spawn(tmp_path, _bank_body)
    single = MemoryBank(SIZE, DIM, payloads=("labels", "index"), dtype="fp16")
    for step in range(STEPS):
        parts = [_batch(step, r) for r in range(WORLD)]  # rank 0 rows first
        single.enqueue(torch.cat([p[0] for p in parts]), labels=torch.cat([p[1] for p in parts]))
    assert int(single.num_seen) == STEPS * WORLD * LOCAL_BATCH
    for res in results:
        for name, value in single.state_dict().items():
            assert torch.equal(res["state"][name], value), name
    for res in results:
        _, idx = single.knn(res["queries"], 4)
        assert torch.equal(res["knn"], idx)


def test_shuffle_unshuffle_across_ranks(tmp_path: Path):
    results = _spawn(tmp_path, _shuffle_body)
    assert torch.equal(results[0]["unshuffle_idx"], results[1]["unshuffle_idx"])
    shuffled = torch.cat([r["shuffled"] for r in results]).flatten()
    assert sorted(shuffled.tolist()) == list(range(WORLD * LOCAL_BATCH))
    # The permutation mixes rows across ranks (fixed seed: not the identity per rank).
    assert any((r["shuffled"].flatten() // LOCAL_BATCH != i).any() for i, r in enumerate(results))
    for res in results:
        assert torch.equal(res["restored"], res["x"] * 10)
        assert torch.equal(res["gathered"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))


@pytest.mark.skipif(not faiss_available(), reason="needs faiss")
def test_auto_backend_is_rank_0s_choice_on_every_rank(tmp_path: Path):
    results = _spawn(tmp_path, _choose_body)
    for res in results:
        assert res["timing_calls"] == ["torch", "faiss", "faiss", "torch", "torch", "faiss"]
        assert res["chosen"] == "faiss" and res["search_calls"] == ["faiss"]
        assert res["unsettled_calls"] == ["torch"]
        assert res["chosen_if_unusable"] == "torch"
    assert len(results[0]["timing_calls_if_unusable"]) == 6  # rank 0 timed and chose faiss
    assert results[1]["timing_calls_if_unusable"] == []
    single = MemoryBank(SIZE, DIM, payloads=(), backend="torch")
    for rank, res in enumerate(results):
        assert torch.equal(res["knn"], single.knn(_batch(99, rank)[0], 3)[1])


def test_single_process_helpers():
    assert not ddp.is_dist() and ddp.world_size() == 1 and ddp.rank() == 0
    x = torch.arange(12.0).view(6, 2)
    assert ddp.all_gather_concat(x) is x
    torch.manual_seed(0)
    shuffled, unshuffle_idx = ddp.shuffle_batch(x)
    assert not torch.equal(shuffled, x)
    assert sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    assert torch.equal(ddp.unshuffle_batch(shuffled, unshuffle_idx), x)
