"""Every method under a real 2-process gloo group, checkpoints from it, and one Lightning DDP run.

One ``mp.spawn`` trains every entry of :data:`CASES` in turn (the start-up cost is paid once).
Each step is what Lightning's DDP runs: the method's step inside a real
``DistributedDataParallel`` wrapper (gradient all-reduce, no per-step buffer broadcast, as
``trainer.strategy: ddp`` builds it), an SGD step, then ``on_train_batch_end`` (deferred bank
writes). The tests then check, per entry, that every replicated tensor is identical on both
ranks, that each bank holds exactly the rows written to it (all-gathered, nothing dropped), that
the loss of the global batch matches one process, and that rank 0's checkpoint loads and
evaluates in a single process. ``test_lightning_ddp_spawn_end_to_end`` runs ``ssl_lib.train``
with ``Trainer(strategy="ddp_spawn", devices=2)`` on CPU.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import teacher_override, tiny_config, write_tiny_teacher
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ssl_lib.config import ConfigError, config_from_dict
from ssl_lib.data import IndexedDataset, SSLDataModule, build_base_dataset
from ssl_lib.data.transforms import eval_transform
from ssl_lib.eval.features import extract_features
from ssl_lib.eval.knn import knn_evaluate
from ssl_lib.memory import MemoryBank
from ssl_lib.methods import METHODS, SSLMethod, base, build_method, load_method
from ssl_lib.methods import barlow_twins as bt
from ssl_lib.train import build_strategy, train

WORLD, GLOBAL_BATCH, STEPS = 2, 16, 4
LOCAL_BATCH = GLOBAL_BATCH // WORLD
BANK_SIZE = 40  # not a multiple of the global batch: writes wrap around mid-batch
PROBE_IMAGES = 6

# One entry per trained setting; a new method or variant is one more entry. Keys:
#   name:   registered method name (default: the entry's key)
#   loss:   "mean" - the mean of the ranks' losses equals the one-process loss of the global
#           batch (per-sample losses, e.g. against an all-gathered bank); "global" - every
#           rank's loss already is the global batch's loss (Barlow Twins' cross-correlation)
#   ddp:    extra DistributedDataParallel arguments (the trainer.strategy the method needs)
#   other keys: config sections merged into tests/conftest.py's tiny_config.
# SyncBatchNorm does not run on CPUs, hence sync_bn: false for the Barlow Twins family here.
CASES: dict[str, dict[str, Any]] = {
    "byol": {"method": {"symmetric": True}},
    "moco": {"method": {"bank_size": BANK_SIZE}},
    "isd": {"method": {"bank_size": BANK_SIZE}},
    "msf": {"method": {"bank_size": BANK_SIZE, "k": 3, "bank_dtype": "fp16"}},
    "barlow_twins": {"method": {"sync_bn": False}, "loss": "global"},
    "blockwise_barlow_twins": {"method": {"sync_bn": False, "head_dim": 16}, "loss": "global"},
    "blockwise_sequential": {
        "name": "blockwise_barlow_twins",
        "method": {"sync_bn": False, "head_dim": 16, "schedule": "sequential"},
        "loss": "global",
        "ddp": {"find_unused_parameters": True},  # trainer.strategy=ddp_find_unused_parameters_true
    },
    "cmsf_2q": {"method": {"bank_size": BANK_SIZE, "k": 3, "k_prime": 4, "num_samples": 64}},
    "cmsf_km": {"method": {"bank_size": BANK_SIZE, "k": 3, "num_samples": 64, "num_clusters": 4}},
    "cmsf_sup": {"method": {"bank_size": BANK_SIZE, "k": 3}},
    "cmsf_semi": {
        "method": {"bank_size": BANK_SIZE, "k": 3, "num_samples": 64, "num_classes": 4},
    },
    "simreg": {
        "method": {"view_mode": "weak_strong"},
        "model": {"projector": None, "predictor": None},
        "teacher": True,
    },
    "compress": {"method": {"bank_size": BANK_SIZE}, "teacher": True},
    "compress_1q": {
        "name": "compress",
        "method": {"bank_size": BANK_SIZE, "variant": "1q"},
        "teacher": True,
    },
}
META_KEYS = ("name", "loss", "ddp", "teacher")
# The frozen teacher of the distillation cases: a tiny_cnn weights file that the ddp_runs
# fixture writes and names here (the spawned processes inherit the environment).
TEACHER_ENV = "SSL_LIB_TEST_TEACHER"


def case_config(case: str) -> DictConfig:
    """The validated config of one :data:`CASES` entry (global batch ``GLOBAL_BATCH``)."""
    entry = CASES[case]
    sections = {k: v for k, v in entry.items() if k not in META_KEYS}
    sections["data"] = {**sections.get("data", {}), "batch_size": GLOBAL_BATCH}
    teacher = [teacher_override(Path(os.environ[TEACHER_ENV]))] if entry.get("teacher") else []
    return config_from_dict(tiny_config(entry.get("name", case), **sections), teacher)


def _batch(step: int, rank: int) -> tuple[list[Tensor], Tensor, Tensor]:
    """Rank ``rank``'s share of the global batch of ``step``: two views, labels, indices."""
    g = torch.Generator().manual_seed(100 * step + rank + 1)
    views = [torch.randn(LOCAL_BATCH, 3, 32, 32, generator=g) for _ in range(2)]
    labels = torch.randint(0, 4, (LOCAL_BATCH,), generator=g)
    return views, labels, torch.arange(LOCAL_BATCH) + rank * LOCAL_BATCH


def _global_batch(step: int) -> tuple[list[Tensor], Tensor, Tensor]:
    """The global batch of ``step``: every rank's share, in rank order."""
    parts = [_batch(step, r) for r in range(WORLD)]
    views = [torch.cat([p[0][v] for p in parts]) for v in range(2)]
    return views, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _probe_images() -> Tensor:
    return torch.randn(PROBE_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _fresh_method(cfg: DictConfig) -> SSLMethod:
    """The method as ``ssl_lib.train`` builds it (same seed, so same weights, on every rank)."""
    torch.manual_seed(cfg.run.seed)
    model = build_method(cfg)
    model.log = lambda *args, **kwargs: None  # no Trainer attached
    model.current_ema_momentum = lambda: 0.9
    return model


def _same(a: Any, b: Any) -> bool:
    """Equality of state entries: tensors, or dicts of tensors (a cache's extra state)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def _banks(model: nn.Module) -> dict[str, MemoryBank]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MemoryBank)}


class _TrainingStep(nn.Module):
    """What Lightning's DDP wrapper runs as ``forward``: the method's training-step loss."""

    def __init__(self, method: SSLMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: list[Tensor], labels: Tensor, index: Tensor) -> Tensor:
        if self.method.uses_target:
            self.method.update_target()
        return self.method.compute_loss(views, labels, index)[0]


def _run_case(case: str, rank: int, out: Path) -> dict[str, Any]:
    cfg = case_config(case)
    ddp_kwargs = CASES[case].get("ddp", {})
    # Loss and gradient of step 0's batch in eval mode (fixed BatchNorm statistics, no noise),
    # to compare with one process computing them on the whole global batch.
    model = _fresh_method(cfg).eval()
    eval_ddp = DistributedDataParallel(_TrainingStep(model), **ddp_kwargs)
    eval_loss = eval_ddp(*_batch(0, rank))
    eval_loss.backward()
    eval_grad = _flat_grad(model)

    model = _fresh_method(cfg)
    writes: list[tuple[str, Tensor, dict[str, Tensor], bool]] = []
    for name, bank in _banks(model).items():

        def record(
            x: Tensor,
            _name: str = name,
            _write=bank.enqueue,
            gathered: bool = False,
            **payloads: Tensor,
        ) -> None:
            copies = {k: v.clone() for k, v in payloads.items()}
            writes.append((_name, x.detach().clone(), copies, gathered))
            _write(x, gathered=gathered, **payloads)

        bank.enqueue = record
    shuffles: list[int] = []
    real_shuffle = base.shuffle_batch
    base.shuffle_batch = lambda x: shuffles.append(x.shape[0]) or real_shuffle(x)
    try:
        ddp_model = DistributedDataParallel(
            _TrainingStep(model), broadcast_buffers=False, **ddp_kwargs
        )
        model.on_train_epoch_start()
        params = [p for m in model.trainable_modules() for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        losses = []
        for step in range(STEPS):
            batch = _batch(step, rank)
            loss = ddp_model(*batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.on_train_batch_end(None, batch, step)
            losses.append(loss.item())
    finally:
        base.shuffle_batch = real_shuffle
    model.eval()
    with torch.no_grad():
        probe = model(_probe_images())
    if rank == 0:  # what a Lightning checkpoint holds for load_method
        ckpt = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
        torch.save(ckpt, out / f"{case}.ckpt")
    return {
        "eval_loss": eval_loss.item(),
        "eval_grad": eval_grad,
        "losses": losses,
        "state": model.state_dict(),
        "bn_buffers": _batchnorm_buffers(model),
        "writes": writes,
        "shuffles": shuffles,
        "probe": probe,
    }


def _flat_grad(model: SSLMethod) -> Tensor:
    """All trainable parameters' gradients as one vector (zeros where there is none)."""
    params = [p for m in model.trainable_modules() for p in m.parameters() if p.requires_grad]
    return torch.cat(
        [torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in params]
    )


def _batchnorm_buffers(model: nn.Module) -> list[str]:
    """State keys of BatchNorm running statistics: per-process, like the original DDP code."""
    return [
        f"{name}.{buffer}"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buffer in ("running_mean", "running_var")
    ]


def _sync_bn_on_cpu() -> str:
    """The error for ``method.sync_bn=true`` in a multi-process CPU run."""
    cfg = config_from_dict(tiny_config("barlow_twins", method={"sync_bn": True}))
    model = build_method(cfg)
    model.setup("fit")
    try:
        model.on_fit_start()
    except ConfigError as err:
        return str(err)
    return "no error"


def _sequential_blocks_under_ddp(find_unused_parameters: bool) -> str:
    """``on_fit_start`` of the sequential blockwise schedule inside a DDP wrapper."""
    model = _fresh_method(case_config("blockwise_sequential"))
    ddp_model = DistributedDataParallel(
        _TrainingStep(model), find_unused_parameters=find_unused_parameters
    )
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(model=ddp_model))
    try:
        model.on_fit_start()
    except ConfigError as err:
        return str(err)
    finally:
        model._trainer = None
    return "no error"


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        for case in CASES:
            try:
                result = _run_case(case, rank, Path(out))
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(out) / f"{case}.rank{rank}.pt")
        misc = {
            "sync_bn_on_cpu": _sync_bn_on_cpu(),
            "sequential_ddp": _sequential_blocks_under_ddp(False),
            "sequential_ddp_unused": _sequential_blocks_under_ddp(True),
        }
        torch.save(misc, Path(out) / f"misc.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Folder with every case's per-rank results and rank 0's checkpoints (one spawn)."""
    out = tmp_path_factory.mktemp("ddp")
    os.environ[TEACHER_ENV] = str(write_tiny_teacher(out / "teacher.pt"))
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def _results(out: Path, case: str) -> list[dict[str, Any]]:
    results = [torch.load(out / f"{case}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
    return results


def test_every_registered_method_has_a_case():
    covered = {CASES[case].get("name", case) for case in CASES}
    missing = sorted(set(METHODS.names()) - covered)
    assert not missing, f"add an entry to CASES for {missing}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_ranks_stay_identical(ddp_runs: Path, case: str):
    results = _results(ddp_runs, case)
    states = [res["state"] for res in results]
    per_process = set(results[0]["bn_buffers"])
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        if key not in per_process:  # weights, EMA target, banks, caches, counters: bit-identical
            assert _same(value, states[1][key]), key
    initial = _fresh_method(case_config(case)).state_dict()
    changed = [
        k
        for k, v in initial.items()
        if isinstance(v, Tensor) and v.is_floating_point() and k not in per_process
    ]
    assert any(not torch.equal(initial[k], states[0][k]) for k in changed), "nothing trained"
    # the batches differed, so each rank's own BatchNorm statistics differ
    assert any(not torch.equal(states[0][k], states[1][k]) for k in per_process)
    model = build_method(case_config(case))
    shuffled = model.uses_target and model.cfg.method.shuffle_bn
    for res in results:  # target batches were shuffled across ranks at every step
        assert all(n == LOCAL_BATCH for n in res["shuffles"])
        assert len(res["shuffles"]) >= STEPS if shuffled else not res["shuffles"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_banks_hold_every_written_row(ddp_runs: Path, case: str):
    results = _results(ddp_runs, case)
    writes = [res["writes"] for res in results]
    assert len(writes[0]) == len(writes[1])
    # Replay every write on a fresh single-process model: rank 0's rows, then rank 1's (or,
    # for rows the method had already all-gathered, the global rows both ranks wrote).
    replay = _banks(build_method(case_config(case)))
    written = dict.fromkeys(replay, 0)
    for (name, x0, p0, g0), (name1, x1, p1, g1) in zip(*writes, strict=True):
        assert name == name1 and g0 == g1
        if g0:
            assert torch.equal(x0, x1) and all(torch.equal(p0[k], p1[k]) for k in p0)
            replay[name].enqueue(x0, gathered=True, **p0)
            written[name] += x0.shape[0]
            continue
        assert x0.shape == x1.shape == (LOCAL_BATCH, x0.shape[1])
        replay[name].enqueue(torch.cat([x0, x1]), **{k: torch.cat([p0[k], p1[k]]) for k in p0})
        written[name] += x0.shape[0] + x1.shape[0]
    state = results[0]["state"]
    if "bank" in written:  # the method's own bank: every step wrote its global batch
        assert written["bank"] >= STEPS * GLOBAL_BATCH
    for name, bank in replay.items():
        assert int(state[f"{name}.num_seen"]) == written[name]
        for key, value in bank.state_dict().items():
            assert torch.equal(state[f"{name}.{key}"], value), f"{name}.{key}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_loss_and_gradient_match_single_process(ddp_runs: Path, case: str):
    results = _results(ddp_runs, case)
    model = _fresh_method(case_config(case)).eval()
    single = _TrainingStep(model)(*_global_batch(0))
    single.backward()
    grad = _flat_grad(model)
    ranks = [res["eval_loss"] for res in results]
    for res in results:  # DDP averaged the gradients: the same on both ranks
        assert torch.equal(res["eval_grad"], results[0]["eval_grad"])
    tolerance = {"rtol": 1e-3, "atol": 1e-5 * float(grad.abs().max())}
    if CASES[case].get("loss", "mean") == "global":
        for value in ranks:
            assert value == pytest.approx(single.item(), rel=1e-4, abs=1e-6)
        # one rank's half on its own (local statistics) gives another loss
        half = _TrainingStep(_fresh_method(case_config(case)).eval())(*_batch(0, 0))
        assert half.item() != pytest.approx(single.item(), rel=1e-3)
        # each rank differentiates the global loss for its own rows only, and DDP divides the
        # sum of those gradients by the number of processes (as the official Barlow Twins)
        torch.testing.assert_close(results[0]["eval_grad"], grad / WORLD, **tolerance)
    else:
        assert sum(ranks) / WORLD == pytest.approx(single.item(), rel=1e-4, abs=1e-6)
        torch.testing.assert_close(results[0]["eval_grad"], grad, **tolerance)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_checkpoint_loads_and_evaluates_in_one_process(ddp_runs: Path, case: str):
    results = _results(ddp_runs, case)
    model = load_method(str(ddp_runs / f"{case}.ckpt"))
    assert type(model) is METHODS.get(model.cfg.method.name)
    for key, value in model.state_dict().items():
        assert _same(value, results[0]["state"][key]), key
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_probe_images()), results[0]["probe"])
    cfg = model.cfg
    feats = []
    for split in (True, False):
        ds = IndexedDataset(build_base_dataset(cfg.data, train=split), eval_transform(32))
        feats.append(extract_features(model, DataLoader(ds, batch_size=32), device="cpu"))
    (bank, bank_y, _), (queries, query_y, _) = feats
    assert bank.shape == (cfg.data.synthetic.num_samples, model(_probe_images()).shape[1])
    result = knn_evaluate(bank, bank_y, queries, query_y, ks=(5,), votes=("majority",))
    assert 0.0 <= result["majority/k=5/top1"] <= 100.0


def test_sync_bn_on_cpu_processes_fails_clearly(ddp_runs: Path):
    for rank in range(WORLD):
        message = torch.load(ddp_runs / f"misc.rank{rank}.pt")["sync_bn_on_cpu"]
        assert "method.sync_bn=true needs GPU processes" in message
        assert "method.sync_bn=false" in message


def test_sequential_blocks_need_unused_parameter_detection(ddp_runs: Path):
    for rank in range(WORLD):
        misc = torch.load(ddp_runs / f"misc.rank{rank}.pt")
        assert "ddp_find_unused_parameters_true" in misc["sequential_ddp"]
        assert misc["sequential_ddp_unused"] == "no error"


@pytest.mark.parametrize("case", ["moco", "isd", "msf"])
def test_bank_keeps_every_row_and_survives_checkpoint_round_trip(tmp_path: Path, case: str):
    """One process, a real Trainer: K=40 is not a multiple of the batch; no row is lost."""
    pl.seed_everything(0, verbose=False)
    cfg = case_config(case)
    model = build_method(cfg)
    writes: list[tuple[Tensor, Tensor]] = []
    real_enqueue = model.bank.enqueue

    def record(x: Tensor, labels: Tensor) -> None:
        writes.append((x.clone(), labels.clone()))
        real_enqueue(x, labels=labels)

    model.bank.enqueue = record
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=SSLDataModule(cfg.data))
    assert [x.shape[0] for x, _ in writes] == [GLOBAL_BATCH] * 3
    assert int(model.bank.num_seen) == 3 * GLOBAL_BATCH  # 48 rows into 40: wrapped
    assert int(model.bank.ptr) == 3 * GLOBAL_BATCH % BANK_SIZE
    rows = torch.cat([x for x, _ in writes])[-BANK_SIZE:]  # the last K rows, ring order
    labels = torch.cat([y for _, y in writes])[-BANK_SIZE:]
    order = (torch.arange(BANK_SIZE) + int(model.bank.ptr)) % BANK_SIZE
    assert torch.equal(model.bank.embeddings[order], rows.to(model.bank.dtype))
    assert torch.equal(model.bank.labels[order], labels)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_method(str(tmp_path / "last.ckpt"))
    assert type(loaded) is type(model)
    for key, value in model.bank.state_dict().items():
        restored = loaded.bank.state_dict()[key]
        assert restored.dtype == value.dtype and torch.equal(restored, value), key


def test_lightning_ddp_spawn_end_to_end(tmp_path: Path):
    """``ssl_lib.train`` with two CPU processes: global batch split, bank and checkpoint."""
    cfg = config_from_dict(
        tiny_config(
            "moco",
            method={"bank_size": BANK_SIZE},
            data={"batch_size": GLOBAL_BATCH},
            run={"output_dir": str(tmp_path), "name": "ddp"},
            trainer={"devices": WORLD, "strategy": "ddp_spawn", "max_epochs": 1},
        )
    )
    run_dir = train(cfg)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    steps = cfg.data.synthetic.num_samples // GLOBAL_BATCH  # each rank loads half of a batch
    assert ckpt["global_step"] == steps
    model = load_method(str(run_dir / "checkpoints" / "last.ckpt"))
    assert int(model.bank.num_seen) == steps * GLOBAL_BATCH  # all-gathered global batches
    assert int(model.bank.ptr) == steps * GLOBAL_BATCH % BANK_SIZE
    assert bool((model.bank.labels >= 0).all())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.backbone.feat_dim)
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize("name, start", [("ddp", "popen"), ("ddp_spawn", "spawn")])
def test_ddp_strategy_skips_buffer_broadcast(name: str, start: str):
    strategy = build_strategy(name)
    assert strategy._ddp_kwargs == {"broadcast_buffers": False}
    assert strategy._start_method == start
    assert build_strategy("auto") == "auto"


def test_sync_bn_error_needs_several_processes(monkeypatch):
    """One process keeps plain BatchNorm; the CPU check fires only with SyncBatchNorm."""
    model = build_method(config_from_dict(tiny_config("barlow_twins")))
    model.setup("fit")
    model.on_fit_start()  # nothing converted, nothing raised
    monkeypatch.setattr(bt, "world_size", lambda: 2)
    model.setup("fit")
    with pytest.raises(ConfigError, match="sync_bn"):
        model.on_fit_start()
