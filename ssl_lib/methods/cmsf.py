"""Constrained mean shift (CMSF; Navaneet et al., ECCV 2022; Tejankar et al., arXiv 2110.10309).

CMSF is MSF (``ssl_lib.methods.msf``) with a different choice of neighbours: the online
prediction ``q`` is pulled towards the ``k`` nearest bank entries of the target ``u`` *among a
constraint set* ``C_i`` of bank rows. The variants differ only in ``C_i``:

``cmsf_2q``  (self-supervised) the ``k_prime`` nearest neighbours of the query's previous-visit
             target embedding among the previous-visit embeddings of the bank's images (a
             two-slot per-image cache); loss ``(L_c + L_msf) / 2``.
``cmsf_km``  (self-supervised) bank rows whose image shares the query's k-means cluster (the
             clusters of a per-image cache of latest targets, recomputed after each epoch);
             loss ``(L_c + L_msf) / 2``.
``cmsf_sup`` (supervised) bank rows with the query's label; loss ``L_c``.
``cmsf_semi`` (semi-supervised; ``ssl_lib.methods.cmsf_semi``) rows with the query's
             pseudo-label.

All variants enqueue the all-gathered targets before searching (so a query's own entry is in the
bank), store dataset indices with the bank rows, and keep every cache identical on all ranks.
When fewer than ``k`` rows satisfy a constraint, ``short_neighbours: fill`` (the original) fills
the remaining slots with the nearest other rows and ``valid_only`` averages the loss over the
valid ones; ``train/short_queries`` logs how many queries of the batch were short either way.

Early training has two options. ``constraint_warmup_epochs: W`` trains the first W epochs with
the plain MSF loss (0: none, as the original). ``unwritten_entries`` says what the constraint
does with state that holds no data yet: ``use`` it as the original does (the 2Q cache's random
vectors, never-written bank rows read as the last image as Python's index -1 does, the
pseudo-labeller before its first round, unfilled labelled-buffer rows as class 0) or ``ignore``
it; ``auto`` (default) is ``use`` without a warm-up and ``ignore`` with one. The defaults
reproduce the original's first epochs exactly. See ``docs/methods/cmsf*.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lib.distributed import all_gather_concat, is_dist, rank
from ssl_lib.memory import MemoryBank, SameCluster, SameLabel, SearchResult
from ssl_lib.memory.cache import SampleCache
from ssl_lib.memory.kmeans import kmeans
from ssl_lib.memory.search import search_blocks
from ssl_lib.methods.base import BankMethodConfig, SSLMethod
from ssl_lib.methods.losses import neighbour_purity, regression_loss
from ssl_lib.methods.registry import METHODS
from ssl_lib.schema import ConfigError, require


@dataclass
class CMSFConfig(BankMethodConfig):
    """Shared CMSF settings (the supervised variant uses exactly these).

    ``short_neighbours``: ``fill`` (original) or ``valid_only``. ``constraint_warmup_epochs``:
    epochs of plain MSF before the constraint applies (0 = the original's behaviour).
    ``unwritten_entries``: ``use`` (original), ``ignore`` or ``auto`` (``use`` when
    ``constraint_warmup_epochs`` is 0, else ``ignore``); see the module docstring.
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "short_neighbours": ("fill", "valid_only"),
        "unwritten_entries": ("auto", "use", "ignore"),
    }

    name: str = "cmsf_sup"
    k: int = 10
    bank_size: int = 128000
    short_neighbours: str = "fill"
    constraint_warmup_epochs: int = 0
    unwritten_entries: str = "auto"

    def check(self) -> None:
        super().check()
        require(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        require(
            self.constraint_warmup_epochs >= 0,
            "constraint_warmup_epochs",
            f"must be >= 0, got {self.constraint_warmup_epochs}",
        )


def ignores_unwritten(m: Any) -> bool:
    """Whether the ``method`` config ``m`` ignores unwritten entries (``auto`` resolved)."""
    if m.unwritten_entries == "auto":
        return m.constraint_warmup_epochs > 0
    return m.unwritten_entries == "ignore"


def set_num_samples(cfg: Any, num_samples: int) -> None:
    """Fill ``method.num_samples`` from the data, or check a recorded value still matches."""
    m = cfg.method
    if m.num_samples is None:
        m.num_samples = num_samples
    elif m.num_samples != num_samples:
        raise ConfigError(
            f"method.num_samples={m.num_samples} but the training data has {num_samples} "
            "images; the per-image caches are sized by it (set method.num_samples=null to use "
            "the data's size)"
        )


class CMSFBase(SSLMethod):
    """Steps shared by the CMSF variants; subclasses choose the constrained neighbours."""

    config_class = CMSFConfig
    needs_predictor = True
    uses_target = True
    mix_unconstrained = False  # self-supervised variants average L_c with the MSF loss
    bank_payloads: tuple[str, ...] = ("labels", "index")

    def __init__(self, config) -> None:
        super().__init__(config)
        m = self.cfg.method
        self.ignore_unwritten = ignores_unwritten(m)
        batch = self.cfg.data.batch_size
        self.bank = self.build_bank(
            max(m.k, batch),
            f"it must hold the global batch (data.batch_size={batch}), which is enqueued before "
            f"the search, and at least method.k={m.k} rows",
            payloads=self.bank_payloads,
        )

    def searched_banks(self) -> list[tuple[MemoryBank, int]]:
        return [(self.bank, self.cfg.method.k)]

    # ----------------------------------------------------------------- helpers
    def constraint_active(self) -> bool:
        """False during the warm-up epochs (plain MSF neighbours)."""
        return self.current_epoch >= self.cfg.method.constraint_warmup_epochs

    def embed(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Online prediction ``q`` of views[0] and normalised target ``u`` of views[1]."""
        q = self.predictor(self.project(views[0]))
        u = F.normalize(self.target_project(views[1]).float(), dim=1)
        return q, u

    def unconstrained(self, u: Tensor) -> SearchResult:
        """MSF's neighbours: the ``k`` nearest bank rows of the target."""
        return self.bank.search(u, self.cfg.method.k)

    def finish(
        self, q: Tensor, u: Tensor, labels: Tensor, constrained: SearchResult | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and logged values from the constrained neighbours (``None`` = warm-up: MSF)."""
        m = self.cfg.method
        plain = constrained is None or self.mix_unconstrained
        unc = self.unconstrained(u) if plain else None
        extra: dict[str, Tensor] = {}
        if constrained is None:
            loss = regression_loss(q, self.bank.gather(unc.indices))
            chosen = unc
        else:
            valid = constrained.valid if m.short_neighbours == "valid_only" else None
            idx = constrained.indices.clamp(min=0)  # strict searches are not used here
            loss = regression_loss(q, self.bank.gather(idx), valid)
            if self.mix_unconstrained:
                loss = 0.5 * (loss + regression_loss(q, self.bank.gather(unc.indices)))
            extra["short_queries"] = (~constrained.valid).any(dim=1).sum().float()
            chosen = constrained
        return loss, {**extra, **neighbour_purity(self.bank, chosen.indices, labels)}

    def gather_batch(self, **tensors: Tensor) -> dict[str, Tensor]:
        """All-gather per-sample tensors (rank order); identical on every rank."""
        return {name: all_gather_concat(t) for name, t in tensors.items()}

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        q, u = self.embed(views)
        columns = self.batch_columns(u, labels.long(), index.long())
        g = self.gather_batch(**columns)
        self.write_caches(g)
        self.bank.enqueue(g["u"], gathered=True, **self.bank_row_payloads(g))
        constrained = self.constrained(u, labels, index) if self.constraint_active() else None
        loss, extra = self.finish(q, u, labels, constrained)
        return loss, {**extra, **self.batch_metrics(columns)}

    # ----------------------------------------------------------------- variant hooks
    def batch_columns(self, u: Tensor, labels: Tensor, index: Tensor) -> dict[str, Tensor]:
        """The per-sample columns of the local batch that every rank receives (gathered)."""
        return {"u": u, "labels": labels, "index": index}

    def write_caches(self, g: dict[str, Tensor]) -> None:
        """Update per-image state from the gathered batch (before the enqueue)."""

    def bank_row_payloads(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        """Payload columns written with the gathered batch."""
        return {"labels": g["labels"], "index": g["index"]}

    def constrained(self, u: Tensor, labels: Tensor, index: Tensor) -> SearchResult:
        """The constrained neighbours of the local queries."""
        raise NotImplementedError

    def batch_metrics(self, columns: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra values to log from the local batch's columns."""
        return {}


# --------------------------------------------------------------------- supervised
@METHODS.register("cmsf_sup")
class CMSFSupervised(CMSFBase):
    """Supervised CMSF: neighbours share the query's (possibly noisy) label; ``L = L_c``, k=10."""

    def constrained(self, u: Tensor, labels: Tensor, index: Tensor) -> SearchResult:
        return self.bank.search(u, self.cfg.method.k, SameLabel(labels.long()))


# --------------------------------------------------------------------- self-supervised
@dataclass
class CMSFCacheConfig(CMSFConfig):
    """Variants with a per-image cache of target embeddings.

    ``num_samples``: training images (``null`` = taken from the data when the run starts).
    ``cache_device``: ``model`` (the model's device, as the original) or ``cpu``.
    ``cache_dtype``: ``fp32`` / ``fp16`` / ``bf16``.
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "cache_device": ("model", "cpu"),
        "cache_dtype": ("fp32", "fp16", "bf16"),
    }

    k: int = 5
    num_samples: int | None = None
    cache_device: str = "model"
    cache_dtype: str = "fp32"


class _CachedCMSF(CMSFBase):
    mix_unconstrained = True
    cache_slots = 1
    cache_init = "unit"

    @classmethod
    def prepare_config(cls, cfg, datamodule) -> None:
        set_num_samples(cfg, len(datamodule.build_train_set()))

    def __init__(self, config) -> None:
        super().__init__(config)
        m = self.cfg.method
        if m.num_samples is None or m.num_samples < 1:
            raise ValueError(
                f"method.num_samples must give the number of training images for "
                f"'{m.name}' (null is filled in by `ssl-lib train`), got {m.num_samples}"
            )
        self.cache = SampleCache(
            m.num_samples,
            self.embed_dim,
            slots=self.cache_slots,
            dtype=m.cache_dtype,
            device=m.cache_device,
            init=self.cache_init,
            seed=self.cfg.run.seed + 1,
        )

    def write_caches(self, g: dict[str, Tensor]) -> None:
        self.cache.write(g["index"], g["u"])

    def bank_images(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Dataset index of bank rows ``start:end`` and which rows hold a written entry.

        Never-written rows (index -1) read as the last image, as in the original.
        """
        idx = self.bank.payload("index")[start:end]
        written = idx >= 0
        return idx % self.cache.num_samples, written


@dataclass
class CMSF2QConfig(CMSFCacheConfig):
    """CMSF-2Q: ``k_prime`` (>= k) nearest neighbours in the previous-visit bank."""

    name: str = "cmsf_2q"
    k_prime: int = 5

    def check(self) -> None:
        super().check()
        require(
            self.k <= self.k_prime <= self.bank_size,
            ("k_prime", "k", "bank_size"),
            f"must lie in [method.k={self.k}, method.bank_size={self.bank_size}], "
            f"got {self.k_prime}",
        )


@METHODS.register("cmsf_2q")
class CMSF2Q(_CachedCMSF):
    """CMSF-2Q: the constraint comes from a second bank of previous-visit target embeddings.

    The second bank is never materialised: its rows are read from the two-slot cache block by
    block during the search (the original gathers a K x D copy every step).
    """

    config_class = CMSF2QConfig
    cache_slots = 2
    # The original's unnormalised random first-epoch "previous" rows. Ignored entries are never
    # read, so the choice only matters when they are used.
    cache_init = "normal"

    def _previous_blocks(self, device: torch.device, chunk: int):
        """The second bank, block by block: each bank row's image's previous-visit embedding."""
        size = self.bank.size
        for start in range(0, size, chunk):
            images, written = self.bank_images(start, min(start + chunk, size))
            rows = self.cache.previous(images).to(device)
            if self.ignore_unwritten:  # only rows whose image has a real previous visit
                twice = self.cache.visits[images.to(self.cache.device)] >= 2
                yield start, rows, (written.to(device) & twice.to(device))
            else:
                yield start, rows

    def constrained(self, u: Tensor, labels: Tensor, index: Tensor) -> SearchResult:
        m = self.cfg.method
        prev_q = self.cache.previous(index).to(u.device)
        sims2, cand = search_blocks(
            self._previous_blocks(u.device, self.bank.chunk_size), prev_q, m.k_prime
        )
        # N^c_i: the k candidates nearest to the current target (all of C_i when k = k').
        sims = torch.einsum("bd,bkd->bk", u, self.bank.gather(cand))
        sims = sims.masked_fill(~torch.isfinite(sims2), float("-inf"))
        top_sims, pos = sims.topk(m.k, dim=1)
        result = SearchResult(top_sims, cand.gather(1, pos), torch.ones_like(pos, dtype=torch.bool))
        if not self.ignore_unwritten:
            return result
        # A query without a previous visit, or with fewer than k candidates that have one,
        # keeps its unconstrained (MSF) neighbours.
        fresh = (self.cache.visits[index.to(self.cache.device)] < 2).to(u.device)
        fallback = (fresh | ~torch.isfinite(top_sims).all(dim=1)).unsqueeze(1)
        if not bool(fallback.any()):
            return result
        unc = self.unconstrained(u)
        return SearchResult(
            torch.where(fallback, unc.similarities, top_sims),
            torch.where(fallback, unc.indices, result.indices),
            result.valid,
        )


@dataclass
class CMSFKMConfig(CMSFCacheConfig):
    """CMSF-KM: ``num_clusters`` k-means clusters of the latest targets, after every epoch.

    ``kmeans_backend``: ``faiss`` (``faiss.Kmeans``), ``torch`` (Lloyd iterations) or ``auto``
    (the faster search backend for the assignment step, and its implementation; see
    ``ssl_lib.memory.kmeans``).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"kmeans_backend": ("auto", "faiss", "torch")}

    name: str = "cmsf_km"
    num_clusters: int = 50000
    kmeans_iters: int = 20
    kmeans_backend: str = "auto"


@METHODS.register("cmsf_km")
class CMSFKMeans(_CachedCMSF):
    """CMSF-KM: neighbours come from the query's k-means cluster of the previous epoch."""

    config_class = CMSFKMConfig
    bank_payloads = ("labels", "index", "clusters")

    @classmethod
    def prepare_config(cls, cfg, datamodule) -> None:
        super().prepare_config(cfg, datamodule)
        m = cfg.method
        if not 1 <= m.num_clusters <= m.num_samples:
            raise ConfigError(
                f"method.num_clusters={m.num_clusters} must lie in [1, {m.num_samples}] "
                "(the number of training images)"
            )

    def __init__(self, config) -> None:
        super().__init__(config)
        # Cluster id of every image; all 0 until the first clustering, as in the original.
        self.register_buffer("cluster_ids", torch.zeros(self.cache.num_samples, dtype=torch.long))
        self.refresh_bank_clusters()

    @torch.no_grad()
    def refresh_bank_clusters(self) -> None:
        """Re-label every bank row with the current cluster of its image."""
        images, written = self.bank_images(0, self.bank.size)
        clusters = self.cluster_ids[images.to(self.cluster_ids.device)]
        if self.ignore_unwritten:  # in no cluster
            clusters = clusters.masked_fill(~written.to(clusters.device), -1)
        self.bank.payload("clusters").copy_(clusters)

    def bank_row_payloads(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        clusters = self.cluster_ids[g["index"].to(self.cluster_ids.device)]
        return {**super().bank_row_payloads(g), "clusters": clusters.to(g["index"].device)}

    def constrained(self, u: Tensor, labels: Tensor, index: Tensor) -> SearchResult:
        query_clusters = self.cluster_ids[index.to(self.cluster_ids.device)].to(u.device)
        return self.bank.search(u, self.cfg.method.k, SameCluster(query_clusters))

    @torch.no_grad()
    def recluster(self) -> None:
        """k-means of the cached latest targets; every rank receives rank 0's ids."""
        m = self.cfg.method
        if rank() == 0:
            x = self.cache.all_latest()
            ids = kmeans(
                x,
                m.num_clusters,
                m.kmeans_iters,
                seed=self.cfg.run.seed + self.current_epoch,
                backend=m.kmeans_backend,
            )
        else:
            ids = torch.empty(self.cache.num_samples, dtype=torch.long)
        ids = ids.to(self.cluster_ids.device)
        if is_dist():
            torch.distributed.broadcast(ids, src=0)
        self.cluster_ids.copy_(ids)
        self.refresh_bank_clusters()
        self.log("train/nonempty_clusters", float(torch.unique(ids).numel()))

    def on_train_epoch_end(self) -> None:
        self.recluster()
