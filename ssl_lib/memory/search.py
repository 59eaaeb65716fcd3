"""Exact k-nearest-neighbour search by inner product, with optional per-query constraints.

Backends
--------
``torch``
    Chunked ``queries @ chunk.T`` followed by ``topk`` per chunk and a running top-k merge. Peak
    extra memory is one ``B x chunk_size`` float32 score block (plus a float32 copy of the chunk
    when the bank is stored in fp16/bf16).
``faiss``
    Exact brute force in faiss. On CPU ``faiss.knn`` (inner-product metric) runs directly on the
    bank's memory when it is stored in float32; fp16/bf16 banks are converted chunk by chunk.
    On CUDA tensors with a GPU build of faiss, ``faiss.bfKnn`` runs on the tensor memory itself.
    faiss cannot mask, so constrained searches always use the torch backend.
``auto``
    ``torch`` on every device. On the 2-core x86 CPU used for ``docs/memory_bank.md``, faiss's
    search was faster than the torch path only at D=512 on an otherwise idle machine, and 2-3x
    slower whenever other work shared the cores (faiss runs its own OpenMP/OpenBLAS thread pool
    next to PyTorch's, which a training process always has busy). On CUDA, cuBLAS GEMM + ``topk``
    is used; faiss-GPU timings have not been measured. Use ``backend="faiss"`` explicitly to opt in.

Similarities are plain inner products in float32; they are cosine similarities when the bank
rows and the queries are L2-normalised.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "faiss")
MaskFn = Callable[[int, int], Tensor]
"""``mask_fn(start, end)`` -> bool ``B x (end - start)``: True where bank row is allowed."""


@dataclass(frozen=True, eq=False)
class SearchResult:
    """Result of :func:`search`.

    ``similarities`` (float32, B x k) and ``indices`` (int64, B x k) are sorted by descending
    similarity, except that in a constrained, non-strict search the slots that did not satisfy the
    constraint come after all valid ones (each group sorted descending). ``valid`` (bool, B x k)
    marks slots that satisfy the constraint (all True without a constraint).
    """

    similarities: Tensor
    indices: Tensor
    valid: Tensor

    @property
    def num_valid(self) -> Tensor:
        """Number of valid neighbours per query (int64, B)."""
        return self.valid.sum(dim=1)

    @property
    def num_short(self) -> int:
        """Number of queries with fewer than k valid neighbours."""
        return int((~self.valid).any(dim=1).sum())


class Constraint(ABC):
    """Restricts, per query, which bank rows count as neighbours.

    Rows outside the allowed set are ranked after every allowed row. When a query has fewer than
    ``k`` allowed rows, the remaining slots are filled with the most similar disallowed rows
    (CMSF's behaviour) and marked invalid in :class:`SearchResult`; with ``strict=True`` they are
    returned as index -1 and similarity -inf instead.
    """

    strict: bool

    @property
    @abstractmethod
    def num_queries(self) -> int:
        """Number of queries the constraint is defined for."""

    def payload_names(self) -> tuple[str, ...]:
        """Bank payloads the constraint reads."""
        return ()

    def check(self, bank_size: int) -> None:
        """Raise ``ValueError`` if the constraint cannot apply to a bank of ``bank_size`` rows."""
        del bank_size

    @abstractmethod
    def chunk_mask(self, payloads: Mapping[str, Tensor], start: int, end: int) -> Tensor:
        """Bool mask ``B x (end - start)`` of allowed bank rows ``start:end``."""


_EMPTY = torch.empty(0, dtype=torch.long)


class _SameValue(Constraint):
    """Rows whose payload equals the query's value; negative values follow :class:`SameLabel`."""

    payload: str

    @abstractmethod
    def query_values(self) -> Tensor:
        """Per-query values compared with the payload."""

    @property
    def num_queries(self) -> int:
        return self.query_values().shape[0]

    def payload_names(self) -> tuple[str, ...]:
        return (self.payload,)

    def chunk_mask(self, payloads: Mapping[str, Tensor], start: int, end: int) -> Tensor:
        bank_values = payloads[self.payload][start:end].view(1, -1)
        q = self.query_values().to(bank_values.device).view(-1, 1)
        return ((q == bank_values) & (bank_values >= 0)) | (q < 0)


@dataclass(eq=False)
class SameLabel(_SameValue):
    """Allow bank rows whose payload ``payload`` equals the query's label (supervised CMSF).

    Bank rows with a negative label (never written, or stored as "unknown") match no labelled
    query. A query with a negative label is unconstrained: every row is allowed (CMSF-semi's
    treatment of non-confident pseudo-labels).
    """

    query_labels: Tensor
    payload: str = "labels"
    strict: bool = False

    def query_values(self) -> Tensor:
        return self.query_labels


@dataclass(eq=False)
class SameCluster(_SameValue):
    """Allow bank rows in the query's cluster (CMSF-KM); same -1 rules as :class:`SameLabel`."""

    query_clusters: Tensor
    payload: str = "clusters"
    strict: bool = False

    def query_values(self) -> Tensor:
        return self.query_clusters


@dataclass(eq=False)
class AllowedIndices(Constraint):
    """Allow an explicit set of bank rows per query (e.g. CMSF-2Q's neighbours in the second bank).

    ``allowed`` is either a bool mask ``B x K``, an int64 tensor ``B x m`` of row indices (negative
    entries are padding), or a sequence of ``B`` 1-D index tensors / lists of varying length.
    """

    allowed: Tensor | Sequence[Tensor | Sequence[int]]
    strict: bool = False
    _rows: Tensor | None = field(init=False, repr=False, default=None)
    _cols: Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        allowed = self.allowed
        if isinstance(allowed, Tensor) and allowed.dim() != 2:
            raise ValueError(
                f"AllowedIndices tensor must be B x K (bool) or B x m (int), "
                f"got shape {tuple(allowed.shape)}"
            )
        if isinstance(allowed, Tensor) and allowed.dtype == torch.bool:
            self._num_queries = allowed.shape[0]
            return
        lists = [torch.as_tensor(ix, dtype=torch.long).reshape(-1).cpu() for ix in allowed]
        self._num_queries = len(lists)
        rows = torch.cat([torch.full_like(ix, i) for i, ix in enumerate(lists)] + [_EMPTY])
        cols = torch.cat(lists + [_EMPTY])
        keep = cols >= 0
        self._rows, self._cols = rows[keep], cols[keep]

    @property
    def num_queries(self) -> int:
        return self._num_queries

    def check(self, bank_size: int) -> None:
        if self._cols is None:
            if self.allowed.shape[1] != bank_size:
                raise ValueError(
                    f"AllowedIndices mask has {self.allowed.shape[1]} columns, "
                    f"expected the bank size {bank_size}"
                )
        elif self._cols.numel() and int(self._cols.max()) >= bank_size:
            raise ValueError(
                f"AllowedIndices contains index {int(self._cols.max())} >= bank size {bank_size}"
            )

    def chunk_mask(self, payloads: Mapping[str, Tensor], start: int, end: int) -> Tensor:
        if self._cols is None:
            return self.allowed[:, start:end]
        sel = (self._cols >= start) & (self._cols < end)
        mask = torch.zeros(self.num_queries, end - start, dtype=torch.bool)
        mask[self._rows[sel], self._cols[sel] - start] = True
        return mask


def faiss_available() -> bool:
    """True when the faiss Python package can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    """True when faiss was built with GPU support."""
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources")


def resolve_backend(backend: str, device: torch.device, masked: bool) -> str:
    """Concrete backend (``"torch"`` or ``"faiss"``) for a search; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if backend != "faiss" or masked:
        return "torch"
    if not faiss_available():
        raise ValueError("backend 'faiss' requested but faiss is not installed")
    if device.type == "cuda" and not faiss_gpu_available():
        raise ValueError("backend 'faiss' on CUDA tensors needs a GPU build of faiss")
    return "faiss"


class _RunningTopK:
    """Top-k (largest) over column blocks seen one after another."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: Tensor | None = None
        self.indices: Tensor | None = None

    def add_scores(self, scores: Tensor, start: int) -> None:
        values, idx = scores.topk(min(self.k, scores.shape[1]), dim=1)
        self.add(values, idx + start)

    def add(self, values: Tensor, indices: Tensor) -> None:
        if self.values is None:
            self.values, self.indices = values, indices
            return
        values = torch.cat([self.values, values], dim=1)
        indices = torch.cat([self.indices, indices], dim=1)
        self.values, pos = values.topk(min(self.k, values.shape[1]), dim=1)
        self.indices = indices.gather(1, pos)


def _blocks(bank: Tensor, chunk_size: int, whole_if_fp32: bool = False):
    """Yield ``(start, float32 block)``; the whole bank at once when allowed and already fp32."""
    if whole_if_fp32 and bank.dtype == torch.float32:
        yield 0, bank
        return
    for start in range(0, bank.shape[0], chunk_size):
        yield start, bank[start : start + chunk_size].float()


_CPU_WORKSPACE: dict[str, Tensor] = {}
_CPU_WORKSPACE_MAX = 64 * 2**20  # elements (256 MiB of float32)


def _score_buffer(rows: int, cols: int, device: torch.device) -> Tensor:
    """Float32 ``rows x cols`` scratch for score blocks.

    On CPU one buffer of up to 256 MiB is kept between calls: allocating a fresh multi-megabyte
    block every step costs page faults comparable to the top-k itself. Larger blocks, and CUDA
    (whose caching allocator already reuses memory), get a new tensor.
    """
    if device.type != "cpu" or rows * cols > _CPU_WORKSPACE_MAX:
        return torch.empty(rows, cols, device=device)
    buf = _CPU_WORKSPACE.get("scores")
    if buf is None or buf.numel() < rows * cols:
        buf = _CPU_WORKSPACE["scores"] = torch.empty(rows * cols)
    return buf[: rows * cols].view(rows, cols)


def _scores(q: Tensor, block: Tensor) -> Tensor:
    """``q @ block.T`` written into the scratch buffer."""
    return torch.mm(q, block.T, out=_score_buffer(q.shape[0], block.shape[0], q.device))


def _torch_search(bank: Tensor, q: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    return search_blocks(_blocks(bank, chunk_size), q, k)


@torch.no_grad()
def search_blocks(blocks: Iterable[tuple], queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of ``queries`` over rows given block by block.

    ``blocks`` yields ``(first_row, rows)`` or ``(first_row, rows, allowed)``: float32 rows on
    the queries' device, e.g. assembled on the fly from a cache that is never materialised whole
    (CMSF-2Q's second bank), and optionally a bool vector marking the rows that may be returned.
    Returns ``(similarities, indices)`` (B x k, descending); slots without an allowed row have
    similarity -inf. ``k`` larger than the number of rows returns all rows.
    """
    top = _RunningTopK(k)
    q = queries.detach().float().contiguous()
    for start, block, *allowed in blocks:
        scores = _scores(q, block)
        if allowed:
            scores = scores.masked_fill(~allowed[0].view(1, -1), float("-inf"))
        top.add_scores(scores, start)
    if top.values is None:
        raise ValueError("search_blocks got no rows to search")
    return top.values, top.indices


def _faiss_cpu_search(bank: Tensor, q: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    import faiss

    top = _RunningTopK(k)
    q_np = q.numpy()
    for start, block in _blocks(bank, chunk_size, whole_if_fp32=True):
        kk = min(k, block.shape[0])
        d, i = faiss.knn(q_np, block.contiguous().numpy(), kk, metric=faiss.METRIC_INNER_PRODUCT)
        top.add(torch.from_numpy(d), torch.from_numpy(i) + start)
    return top.values, top.indices


@functools.cache
def _gpu_resources():
    import faiss

    return faiss.StandardGpuResources()


def _faiss_gpu_search(bank: Tensor, q: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    # Not exercised by the test suite (no GPU build of faiss on the test machine). It follows
    # faiss.contrib.torch_utils: bfKnn reads the CUDA tensors in place and runs on PyTorch's
    # current stream, so nothing is copied to the host. fp16/bf16 banks are converted to fp32 per
    # chunk so that the arithmetic is float32 like the other backends.
    import faiss
    from faiss.contrib import torch_utils

    if k > 2048:  # faiss GPU k-selection limit
        return _torch_search(bank, q, k, chunk_size)
    res = _gpu_resources()
    top = _RunningTopK(k)
    with torch.cuda.device(bank.device):
        for start, block in _blocks(bank, chunk_size, whole_if_fp32=True):
            block = block.contiguous()
            kk = min(k, block.shape[0])
            dist = torch.empty(q.shape[0], kk, device=q.device, dtype=torch.float32)
            idx = torch.empty(q.shape[0], kk, device=q.device, dtype=torch.int64)
            args = faiss.GpuDistanceParams()
            args.metric = faiss.METRIC_INNER_PRODUCT
            args.k = kk
            args.dims = q.shape[1]
            args.vectors = torch_utils.swig_ptr_from_FloatTensor(block)
            args.vectorsRowMajor = True
            args.vectorType = faiss.DistanceDataType_F32
            args.numVectors = block.shape[0]
            args.queries = torch_utils.swig_ptr_from_FloatTensor(q)
            args.queriesRowMajor = True
            args.queryType = faiss.DistanceDataType_F32
            args.numQueries = q.shape[0]
            args.outDistances = torch_utils.swig_ptr_from_FloatTensor(dist)
            args.outIndices = torch_utils.swig_ptr_from_IndicesTensor(idx)
            args.outIndicesType = faiss.IndicesDataType_I64
            args.device = bank.device.index if bank.device.index is not None else -1
            with torch_utils.using_stream(res):
                faiss.bfKnn(res, args)
            top.add(dist, idx + start)
    return top.values, top.indices


def _masked_search(
    bank: Tensor, q: Tensor, k: int, chunk_size: int, mask_fn: MaskFn, strict: bool
) -> SearchResult:
    allowed = _RunningTopK(k)
    fallback = None if strict else _RunningTopK(k)
    neg_inf = float("-inf")
    for start, block in _blocks(bank, chunk_size):
        scores = _scores(q, block)
        mask = mask_fn(start, start + block.shape[0]).to(scores.device)
        allowed.add_scores(scores.masked_fill(~mask, neg_inf), start)
        if fallback is not None:
            fallback.add_scores(scores.masked_fill(mask, neg_inf), start)
    valid = torch.isfinite(allowed.values)
    if fallback is None:
        sims = allowed.values
        idx = allowed.indices.masked_fill(~valid, -1)
        return SearchResult(sims, idx, valid)
    # Slot j takes the j-th allowed row while there are any, then the (j - n_valid)-th other row.
    n_valid = valid.sum(dim=1, keepdim=True)
    slot = torch.arange(k, device=q.device).expand_as(valid)
    pick = torch.where(slot < n_valid, slot, slot - n_valid + k)
    sims = torch.cat([allowed.values, fallback.values], dim=1).gather(1, pick)
    idx = torch.cat([allowed.indices, fallback.indices], dim=1).gather(1, pick)
    return SearchResult(sims, idx, slot < n_valid)


@torch.no_grad()
def search(
    bank: Tensor,
    queries: Tensor,
    k: int,
    *,
    backend: str = "auto",
    chunk_size: int = 65536,
    mask_fn: MaskFn | None = None,
    strict: bool = False,
) -> SearchResult:
    """Exact top-``k`` inner-product search of ``queries`` (B x D) in ``bank`` (K x D).

    Arithmetic is float32 whatever the bank's storage dtype. ``mask_fn`` restricts the allowed
    rows per query (see :class:`Constraint` for the ranking of disallowed rows and ``strict``).
    The result carries no gradient.
    """
    num_rows, dim = bank.shape
    if not 1 <= k <= num_rows:
        raise ValueError(f"k must be in [1, {num_rows}] (the bank size), got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if queries.dim() != 2 or queries.shape[1] != dim:
        raise ValueError(
            f"queries must have shape (B, {dim}), got {tuple(queries.shape)} "
            f"(expected dim {dim}, actual {queries.shape[-1]})"
        )
    q = queries.detach().float().contiguous()
    name = resolve_backend(backend, bank.device, masked=mask_fn is not None)
    if mask_fn is not None:
        return _masked_search(bank, q, k, chunk_size, mask_fn, strict)
    if name == "faiss":
        fn = _faiss_gpu_search if bank.is_cuda else _faiss_cpu_search
    else:
        fn = _torch_search
    sims, idx = fn(bank, q, k, chunk_size)
    return SearchResult(sims, idx, torch.ones_like(idx, dtype=torch.bool))
