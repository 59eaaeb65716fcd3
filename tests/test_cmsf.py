"""CMSF: constraint construction against brute-force references of the original formulas,
supervised label purity, checkpoint round trips and configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import cpu_trainer, tiny_config
from torch.nn import functional as F

from ssl_lib.config import ConfigError, config_from_dict
from ssl_lib.data import SSLDataModule
from ssl_lib.memory.cache import SampleCache
from ssl_lib.methods import build_method, load_method, prepare_config
from ssl_lib.methods.losses import regression_loss as masked_msf_loss
from ssl_lib.methods.losses import regression_loss as msf_loss

N, K, B, D = 40, 27, 8, 16  # images, bank rows (not a multiple of B: wrap-around), batch, dim


def cmsf_config(make_config, name: str, data: dict | None = None, **method):
    defaults = {"bank_size": K, "k": 3}
    if name in ("cmsf_2q", "cmsf_km", "cmsf_semi"):
        defaults["num_samples"] = N
    if name == "cmsf_semi":
        defaults["num_classes"] = 10
    if name == "cmsf_km":
        defaults["num_clusters"] = 4
    data = {"batch_size": B, "synthetic": {"num_samples": N}, **(data or {})}
    return make_config(name, method={**defaults, **method}, data=data)


def fill(model, steps: int, gen: torch.Generator, labels_from: int = 5) -> None:
    """Enqueue ``steps`` random batches of normalised rows through the method's own writes."""
    for _ in range(steps):
        u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
        index = torch.randperm(N, generator=gen)[:B]
        labels = torch.randint(0, labels_from, (B,), generator=gen)
        g = {"u": u, "labels": labels, "index": index}
        model.write_caches(g)
        model.bank.enqueue(u, gathered=True, **model.bank_row_payloads(g))


def neighbour_sets(result) -> list[set[int]]:
    return [set(row[ok].tolist()) for row, ok in zip(result.indices, result.valid, strict=True)]


def reference_topk_within(d_t: torch.Tensor, allowed: torch.Tensor, k: int) -> list[set[int]]:
    """The original's masking: +5 outside the allowed set, k smallest; keep the allowed ones."""
    masked = d_t + 5.0 * (~allowed).float()
    idx = masked.topk(k, dim=1, largest=False).indices
    return [set(i for i in row.tolist() if allowed[q, i]) for q, row in enumerate(idx)]


@pytest.mark.parametrize("k, k_prime, steps", [(3, 3, 2), (3, 3, 12), (2, 5, 12)])
def test_2q_constraint_equals_original_formula(make_config, k, k_prime, steps):
    gen = torch.Generator().manual_seed(0)
    model = build_method(cmsf_config(make_config, "cmsf_2q", k=k, k_prime=k_prime))
    # 2 steps (+1 below): 24 of 27 rows written, three still hold index -1, which the
    # original reads as the last image. 12 steps: the ring wraps, images are revisited.
    fill(model, steps, gen)
    # Make the last image's previous embedding the best match of query 0's previous one, so
    # the never-written rows (read as that image) enter the constraint set.
    index = torch.randperm(N - 1, generator=gen)[:B]
    cache = model.cache
    cache.data[cache.next_slot[N - 1], N - 1] = 10 * cache.previous(index[:1])[0]
    u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    g = {"u": u, "labels": torch.zeros(B, dtype=torch.long), "index": index}
    model.write_caches(g)
    model.bank.enqueue(u, gathered=True, **model.bank_row_payloads(g))
    got = model.constrained(u, g["labels"], index)
    assert int((model.bank.payload("index") == -1).sum()) == (3 if steps == 2 else 0)

    # Original: pool[pool_qindex[n], n] after the toggle, Python's -1 indexing included.
    pool, qidx = model.cache.data.float(), model.cache.next_slot
    iq = model.bank.payload("index")
    m_prev = pool[qidx[iq], iq]
    u_prev = pool[qidx[index], index]
    c = (2 - 2 * u_prev @ m_prev.T).topk(k_prime, dim=1, largest=False).indices
    d_t = 2 - 2 * u @ model.bank.embeddings.T
    d_t = d_t.scatter_add(1, c, torch.full(c.shape, -5.0))
    expected = d_t.topk(k, dim=1, largest=False).indices
    assert neighbour_sets(got) == [set(r.tolist()) for r in expected]
    assert bool(got.valid.all())


def test_2q_improved_mode_ignores_unwritten_rows_and_first_visits(make_config):
    gen = torch.Generator().manual_seed(1)
    model = build_method(
        cmsf_config(make_config, "cmsf_2q", k=2, k_prime=2, constraint_warmup_epochs=1)
    )
    fill(model, 2, gen)
    u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    index = torch.arange(B)
    got = model.constrained(u, torch.zeros(B, dtype=torch.long), index)
    visits = model.cache.visits
    iq = model.bank.payload("index")
    usable = (iq >= 0) & (visits[iq.clamp(min=0)] >= 2)
    unc = model.unconstrained(u)
    for q in range(B):
        if visits[index[q]] < 2 or int(usable.sum()) < 2:
            assert got.indices[q].tolist() == unc.indices[q].tolist()
        else:
            assert all(bool(usable[i]) for i in got.indices[q].tolist())


def test_km_constraint_equals_original_formula(make_config):
    gen = torch.Generator().manual_seed(2)
    model = build_method(cmsf_config(make_config, "cmsf_km", k=4))
    fill(model, 3, gen)  # 24 of 27 rows written; rows 24..26 still hold index -1
    u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    index = torch.randperm(N - 1, generator=gen)[:B]
    # A clustering as after an epoch; cluster 3 = the query index[0] and the last image, which
    # the original also reads for never-written rows (Python's index -1).
    ids = torch.randint(0, 3, (N,), generator=gen)
    ids[index[0]] = ids[N - 1] = 3
    model.cluster_ids.copy_(ids)
    model.refresh_bank_clusters()
    got = model.constrained(u, torch.zeros(B, dtype=torch.long), index)

    iq = model.bank.payload("index")
    allowed = ids[iq].view(1, -1) == ids[index].view(-1, 1)
    d_t = 2 - 2 * u @ model.bank.embeddings.T
    assert neighbour_sets(got) == reference_topk_within(d_t, allowed, 4)
    assert got.num_valid.tolist() == allowed.sum(1).clamp(max=4).tolist()
    assert set(torch.nonzero(iq < 0).flatten().tolist()) <= neighbour_sets(got)[0]

    fill(model, 1, gen)  # rows written now take their image's current cluster
    got = model.constrained(u, torch.zeros(B, dtype=torch.long), index)
    iq = model.bank.payload("index")
    allowed = ids[iq].view(1, -1) == ids[index].view(-1, 1)
    d_t = 2 - 2 * u @ model.bank.embeddings.T
    assert neighbour_sets(got) == reference_topk_within(d_t, allowed, 4)


def test_km_first_epoch_is_plain_msf(make_config):
    """Before the first clustering every id is 0: the constraint allows every row."""
    gen = torch.Generator().manual_seed(3)
    model = build_method(cmsf_config(make_config, "cmsf_km", k=4))
    fill(model, 1, gen)
    u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    got = model.constrained(u, torch.zeros(B, dtype=torch.long), torch.arange(B))
    assert torch.equal(got.indices, model.unconstrained(u).indices)


def test_supervised_neighbours_share_the_label(make_config):
    gen = torch.Generator().manual_seed(4)
    model = build_method(cmsf_config(make_config, "cmsf_sup", k=3))
    fill(model, 2, gen, labels_from=3)  # rows 16..26 keep label -1: never a match
    u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # 3 and 4 are not in the bank
    got = model.constrained(u, labels, torch.arange(B))
    bank_labels = model.bank.payload("labels")
    allowed = bank_labels.view(1, -1) == labels.view(-1, 1)
    d_t = 2 - 2 * u @ model.bank.embeddings.T
    assert neighbour_sets(got) == reference_topk_within(d_t, allowed, 3)
    enough = allowed.sum(1) >= 3
    assert bool(enough.any()) and bool((~enough).any())
    chosen = bank_labels[got.indices]
    assert bool((chosen[enough] == labels[enough].unsqueeze(1)).all())
    assert got.num_short == int((~enough).sum())


def test_supervised_step_on_synthetic_data(make_config):
    """A real step: every chosen neighbour of a query shares its label when k such rows exist."""
    torch.manual_seed(0)
    cfg = cmsf_config(make_config, "cmsf_sup", k=3, bank_size=64)
    model = build_method(cfg)
    dm = SSLDataModule(cfg.data)
    loader = dm.build_train_set()
    for step in range(4):
        items = [loader[i] for i in range(step * B, (step + 1) * B)]
        views = [torch.stack([it[0][v] for it in items]) for v in range(2)]
        labels = torch.tensor([it[1] for it in items])
        index = torch.tensor([it[2] for it in items])
        loss, extra = model.compute_loss(views, labels, index)
        assert torch.isfinite(loss)
    u = F.normalize(model.target_project(views[1]), dim=1)
    got = model.constrained(u, labels, index)
    bank_labels = model.bank.payload("labels")
    enough = (bank_labels.view(1, -1) == labels.view(-1, 1)).sum(1) >= 3
    assert bool(enough.all())
    assert bool((bank_labels[got.indices] == labels.unsqueeze(1)).all())
    assert extra["purity"].item() == 1.0


@pytest.mark.parametrize("conf_labels", [True, False])
def test_semi_constraint_equals_original_formula(make_config, conf_labels):
    gen = torch.Generator().manual_seed(5)
    model = build_method(cmsf_config(make_config, "cmsf_semi", k=3))
    for _ in range(2):
        u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
        pseudo = torch.randint(-1, 3, (B,), generator=gen)
        model.bank.enqueue(u, gathered=True, labels=pseudo, index=torch.arange(B), pseudo=pseudo)
    u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    query = torch.randint(0 if conf_labels else -1, 3, (B,), generator=gen)
    from ssl_lib.memory import SameLabel

    got = model.bank.search(u, 3, SameLabel(query, payload="pseudo"))
    bank_pseudo = model.bank.payload("pseudo")
    allowed = (bank_pseudo.view(1, -1) == query.view(-1, 1)) & (bank_pseudo.view(1, -1) >= 0)
    allowed |= (query < 0).view(-1, 1)  # non-confident queries: no constraint
    d_t = 2 - 2 * u @ model.bank.embeddings.T
    assert neighbour_sets(got) == reference_topk_within(d_t, allowed, 3)


def test_semi_pseudo_labels_follow_confidence(make_config):
    model = build_method(
        cmsf_config(make_config, "cmsf_semi", data={"labelled_fraction": 0.5}, confidence=0.5)
    )
    model.is_labelled[: N // 2] = True
    u = F.normalize(torch.randn(B, D), dim=1)
    labels = torch.arange(B) % 10
    index = torch.tensor([0, 1, 2, 3, 30, 31, 32, 33])
    with torch.no_grad():
        model.pseudo_head[-1].weight.zero_()
        model.pseudo_head[-1].bias.copy_(torch.arange(10.0) * 0.0)
        model.pseudo_head[-1].bias[7] = 10.0  # class 7 with confidence ~1
    got = model.pseudo_labels(u, labels, index)
    assert got[:4].tolist() == labels[:4].tolist()  # labelled: the true label
    assert got[4:].tolist() == [7, 7, 7, 7]
    model.cfg.method.confidence = 1.0
    with torch.no_grad():
        model.pseudo_head[-1].bias.zero_()  # uniform: confidence 0.1 < 1
    assert model.pseudo_labels(u, labels, index)[4:].tolist() == [-1] * 4


def test_masked_loss():
    q = torch.randn(4, 6)
    n = F.normalize(torch.randn(4, 3, 6), dim=-1)
    assert masked_msf_loss(q, n).item() == pytest.approx(msf_loss(q, n).item(), rel=1e-6)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    qn = F.normalize(q, dim=-1)
    per = [(2 - 2 * n[i][valid[i]] @ qn[i]).mean() for i in (0, 1, 3)]
    expected = torch.stack(per).mean()
    assert masked_msf_loss(q, n, valid).item() == pytest.approx(expected.item(), rel=1e-5)


def test_sample_cache_slots_and_extra_state():
    cache = SampleCache(5, 3, slots=2, dtype="fp16", init="normal", seed=0)
    first = torch.ones(2, 3)
    cache.write(torch.tensor([1, 4]), first)
    cache.write(torch.tensor([1]), 2 * torch.ones(1, 3))
    assert cache.latest(torch.tensor([1, 4])).tolist() == [[2.0] * 3, [1.0] * 3]
    assert cache.previous(torch.tensor([1])).tolist() == [[1.0] * 3]
    assert cache.visits.tolist() == [0, 2, 0, 0, 1]
    other = SampleCache(5, 3, slots=2, dtype="fp16", seed=9)
    other.set_extra_state(cache.get_extra_state())
    assert torch.equal(other.data, cache.data) and torch.equal(other.next_slot, cache.next_slot)
    with pytest.raises(ValueError, match="different dataset size"):
        SampleCache(6, 3, slots=2).set_extra_state(cache.get_extra_state())
    with pytest.raises(ValueError, match="out of range"):
        cache.write(torch.tensor([5]), torch.ones(1, 3))


VARIANT_STATE = {
    "cmsf_2q": {"method": {"cache_device": "cpu", "cache_dtype": "fp16"}},
    "cmsf_km": {"method": {"num_clusters": 5, "kmeans_backend": "faiss"}},
    "cmsf_sup": {},
    "cmsf_semi": {"data": {"labelled_fraction": 0.25}, "method": {"pseudo_epochs": 2}},
}


@pytest.mark.parametrize("name", sorted(VARIANT_STATE))
def test_checkpoint_round_trip_restores_every_cache(tmp_path: Path, make_config, name: str):
    pl.seed_everything(0, verbose=False)
    extra = VARIANT_STATE[name]
    cfg = make_config(
        name,
        method={"bank_size": 40, "k": 3, "sup_cache_size": 24, **extra.get("method", {})}
        if name == "cmsf_semi"
        else {"bank_size": 40, "k": 3, **extra.get("method", {})},
        data={"batch_size": B, "synthetic": {"num_samples": 48}, **extra.get("data", {})},
        trainer={"max_epochs": 2},
    )
    dm = SSLDataModule(cfg.data)
    dm.check()
    prepare_config(cfg, dm)
    model = build_method(cfg)
    trainer = cpu_trainer(max_epochs=2)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_method(str(tmp_path / "last.ckpt"))
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, dict):  # a SampleCache's extra state
            for part, tensor in value.items():
                assert torch.equal(tensor, after[key][part]), (key, part)
        else:
            assert torch.equal(value, after[key]), key
    if name in ("cmsf_2q", "cmsf_km"):
        assert int((loaded.cache.visits > 0).sum()) > 0
        assert loaded.cache.data.dtype == model.cache.data.dtype
    if name == "cmsf_km":
        assert int(loaded.cluster_ids.unique().numel()) > 1  # reclustered after each epoch
    if name == "cmsf_semi":
        assert int(loaded.pseudo_rounds) >= 2 and int(loaded.is_labelled.sum()) > 0


def test_config_errors(make_config):
    cfg = cmsf_config(make_config, "cmsf_km", num_clusters=100, num_samples=None)
    dm = SSLDataModule(cfg.data)
    with pytest.raises(ConfigError, match="num_clusters=100 must lie in"):
        prepare_config(cfg, dm)
    cfg = cmsf_config(make_config, "cmsf_2q", num_samples=41)
    with pytest.raises(ConfigError, match="num_samples=41 but the training data has 40"):
        prepare_config(cfg, SSLDataModule(cfg.data))
    cfg = cmsf_config(make_config, "cmsf_semi", num_samples=None)
    with pytest.raises(ConfigError, match="data.labelled_fraction"):
        prepare_config(cfg, SSLDataModule(cfg.data))
    with pytest.raises(ValueError, match="k_prime must lie in"):
        build_method(cmsf_config(make_config, "cmsf_2q", k=3, k_prime=2))
    with pytest.raises(ConfigError, match="short_neighbours"):
        cmsf_config(make_config, "cmsf_sup", short_neighbours="drop")


# ----------------------------------------------------------------------------- two processes
DDP_WORLD, DDP_BATCH, DDP_STEPS, DDP_N = 2, 16, 3, 48
DDP_METHODS = {
    "cmsf_2q": {"k": 3, "k_prime": 4},
    "cmsf_km": {"k": 3, "num_clusters": 6, "kmeans_backend": "faiss"},
    "cmsf_sup": {"k": 3},
    "cmsf_semi": {"k": 3, "sup_cache_size": 24, "pseudo_epochs": 2, "pseudo_batch_size": 8},
}


def _ddp_config(name: str):
    method = {"bank_size": 40, "num_samples": DDP_N, **DDP_METHODS[name]}
    if name == "cmsf_sup":
        method.pop("num_samples")
    if name == "cmsf_semi":
        method["num_classes"] = 4
    data = {"batch_size": DDP_BATCH, "synthetic": {"num_samples": DDP_N}}
    return config_from_dict(tiny_config(name, method=method, data=data))


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=DDP_WORLD)
    try:
        local = DDP_BATCH // DDP_WORLD
        for name in DDP_METHODS:
            torch.manual_seed(0)  # same initial weights on both ranks
            model = build_method(_ddp_config(name))
            model.log = lambda *args, **kwargs: None  # no Trainer here
            model.current_ema_momentum = lambda: 0.9
            if name == "cmsf_semi":
                model.is_labelled[::2] = True
            params = [p for m in model.trainable_modules() for p in m.parameters()]
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
            for step in range(2 * DDP_STEPS):
                g = torch.Generator().manual_seed(step)  # the same global batch on both ranks
                index = torch.randperm(DDP_N, generator=g)[:DDP_BATCH]
                views = [torch.randn(DDP_BATCH, 3, 32, 32, generator=g) for _ in range(2)]
                labels = torch.randint(0, 4, (DDP_BATCH,), generator=g)
                mine = slice(rank * local, (rank + 1) * local)
                model.update_target()
                loss, _ = model.compute_loss([v[mine] for v in views], labels[mine], index[mine])
                opt.zero_grad()
                loss.backward()
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= DDP_WORLD
                opt.step()
                if step == DDP_STEPS - 1:  # an "epoch end"
                    if name == "cmsf_km":
                        model.recluster()
                    if name == "cmsf_semi":
                        model.train_pseudo_labeller()
            torch.save(model.state_dict(), Path(out) / f"{name}_rank{rank}.pt")
            if rank == 0:
                ckpt = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
                torch.save(ckpt, Path(out) / f"{name}.ckpt")
    finally:
        dist.destroy_process_group()


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def test_ddp_ranks_hold_identical_cmsf_state(tmp_path: Path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=DDP_WORLD, join=True)
    for name in DDP_METHODS:
        states = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(DDP_WORLD)]
        shared = [k for k in states[0] if not k.startswith(("backbone.", "projector.", "target."))]
        shared = [k for k in shared if not k.startswith("predictor.") or "running" not in k]
        for key in shared:  # bank, caches, cluster ids, labelled buffer, pseudo-labeller
            assert _same(states[0][key], states[1][key]), (name, key)
        for key in states[0]:  # averaged gradients keep the online weights in step
            if key.startswith(("backbone.", "projector.")) and "running" not in key:
                torch.testing.assert_close(states[0][key], states[1][key], msg=(name, key))
        assert int(states[0]["bank.num_seen"]) == 2 * DDP_STEPS * DDP_BATCH
        if name in ("cmsf_2q", "cmsf_km"):
            assert int((states[0]["cache._extra_state"]["visits"] > 0).sum()) > DDP_BATCH
        if name == "cmsf_km":
            assert states[0]["cluster_ids"].unique().numel() > 1
        if name == "cmsf_semi":
            assert int(states[0]["pseudo_rounds"]) == 1
            assert int((states[0]["sup_cache.labels"] >= 0).sum()) > 0
        loaded = load_method(str(tmp_path / f"{name}.ckpt"))  # one process, evaluates
        assert _same(loaded.state_dict(), states[0])
        loaded.eval()
        feats = loaded(torch.randn(4, 3, 32, 32))
        assert feats.shape == (4, loaded.backbone.feat_dim) and bool(torch.isfinite(feats).all())


@pytest.mark.parametrize("policy", ["fill", "valid_only"])
def test_short_neighbours_policy_and_count(make_config, policy):
    gen = torch.Generator().manual_seed(6)
    model = build_method(cmsf_config(make_config, "cmsf_sup", k=3, short_neighbours=policy))
    fill(model, 2, gen, labels_from=3)
    u = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    q = torch.randn(B, D, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # 3 and 4: no row in the bank
    result = model.constrained(u, labels, torch.arange(B))
    loss, extra = model.finish(q, u, labels, result)
    neighbours = model.bank.gather(result.indices)
    valid = result.valid if policy == "valid_only" else None
    assert loss.item() == pytest.approx(masked_msf_loss(q, neighbours, valid).item(), rel=1e-6)
    other = masked_msf_loss(q, neighbours, None if valid is not None else result.valid)
    assert loss.item() != pytest.approx(other.item(), rel=1e-6)  # the policies differ here
    assert extra["short_queries"].item() == result.num_short >= 2


# ----------------------------------------------------------- the pseudo-labeller's batches
def test_pseudo_labeller_trains_on_every_labelled_row(make_config):
    """17 rows in batches of 8: the 17th joins the second batch instead of being skipped."""
    from ssl_lib.methods.cmsf_semi import train_classifier
    from ssl_lib.models import MLPConfig, build_mlp

    torch.manual_seed(0)
    head = build_mlp(D, MLPConfig(hidden_dim=32, out_dim=4))
    seen: list[int] = []
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    feats = torch.randn(17, D, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(17) % 4
    train_classifier(head, feats, labels, 2, 8, 0.01, 0.9, 0.0, seed=0)
    assert seen == [8, 9, 8, 9]


@pytest.mark.parametrize("key", ["pseudo_batch_size", "sup_cache_size"])
def test_pseudo_labeller_batch_of_one_is_a_config_error(make_config, key):
    cfg = cmsf_config(make_config, "cmsf_semi", **{key: 1})
    with pytest.raises(ConfigError, match=rf"method.{key}=1: the pseudo-labeller has BatchNorm"):
        build_method(cfg)


def test_pseudo_labeller_round_with_one_labelled_row_warns(make_config):
    model = build_method(cmsf_config(make_config, "cmsf_semi", constraint_warmup_epochs=1))
    model.log = lambda *args, **kwargs: None  # no Trainer attached
    model.sup_cache.enqueue(F.normalize(torch.randn(1, D), dim=1), labels=torch.tensor([3]))
    with pytest.warns(UserWarning, match="round skipped: the labelled buffer holds 1 embedding"):
        model.train_pseudo_labeller()
    assert int(model.pseudo_rounds) == 1


# ----------------------------------------------------------- early-training options
@pytest.mark.parametrize(
    "warmup, unwritten, ignored",
    [(0, "auto", False), (1, "auto", True), (1, "use", False), (0, "ignore", True)],
)
def test_unwritten_entries_option_is_independent_of_the_warmup(
    make_config, warmup, unwritten, ignored
):
    """KM: never-written bank rows read as the last image's cluster (use) or as no cluster."""
    gen = torch.Generator().manual_seed(6)
    model = build_method(
        cmsf_config(
            make_config,
            "cmsf_km",
            constraint_warmup_epochs=warmup,
            unwritten_entries=unwritten,
        )
    )
    fill(model, 1, gen)  # rows 8..26 are never written (index -1)
    model.cluster_ids.copy_(torch.arange(N) % 4)
    model.refresh_bank_clusters()
    unwritten_rows = model.bank.payload("clusters")[model.bank.payload("index") < 0]
    last_image = int(model.cluster_ids[N - 1])
    assert unwritten_rows.tolist() == [-1 if ignored else last_image] * 19


def test_semi_warmup_epochs_train_plain_msf(make_config):
    """During constraint_warmup_epochs every variant, the semi-supervised one included, uses
    the unconstrained MSF neighbours (no constraint, so no short queries are counted)."""
    torch.manual_seed(0)
    views = [torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)]
    labels, index = torch.arange(B) % 3, torch.arange(B)
    losses = {}
    for warmup in (0, 1):
        model = build_method(cmsf_config(make_config, "cmsf_semi", constraint_warmup_epochs=warmup))
        model.is_labelled[:] = True  # every query is constrained by its true label
        _, extra = model.compute_loss(views, labels, index)
        losses[warmup] = extra
    assert "short_queries" in losses[0] and "short_queries" not in losses[1]
    assert "confident_unlabelled" in losses[1]
