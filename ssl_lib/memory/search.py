"""Exact top-``k`` nearest-neighbour search: the one search behind the memory bank, the kNN
evaluator and k-means assignment.

Scores are float32 whatever the storage dtype: inner products (``metric="ip"``, cosine
similarities when rows and queries are L2-normalised) or negated squared Euclidean distances
(``metric="l2"``, k-means assignment). Results are sorted by descending score.

Chunking and devices
--------------------
The bank is read in chunks of ``chunk_size`` rows (outer loop) and the queries in chunks of
``query_chunk`` rows (inner loop; ``None`` = all queries at once). Each bank chunk is moved to
the queries' device and cast to float32 once, so a bank kept in host memory can serve queries on
a GPU; a float32 bank on the queries' device is read in place. Every (query chunk, bank chunk)
block keeps its top-``k`` and merges it into a running top-``k`` per query. Besides the
``Q x k`` results the search holds one ``query_chunk x chunk_size`` float32 score block (on CPU a
scratch buffer of up to 256 MiB reused between calls), one float32 bank chunk when the bank is
stored in fp16/bf16 or elsewhere, and one merge of ``query_chunk x 2k`` candidates. Results live
on the queries' device.

Backends
--------
``torch``
    ``torch.mm`` into the score block, then ``topk`` (``max`` for ``k = 1``, so the lowest row
    index wins exact ties, like ``argmax``).
``faiss``
    ``faiss.knn`` per block on CPU tensors; ``faiss.knn_gpu`` on CUDA tensors with a GPU build of
    faiss (it reads the CUDA memory in place on PyTorch's current stream; ``k <= 2048``).
    faiss cannot mask, so constrained searches and :func:`search_blocks` always run ``torch``.
``auto``
    The faster of the two for the case at hand, measured once per process and case: device,
    bank rows, dimension, storage dtype, rows per query chunk, ``chunk_size``, ``k`` and metric.
    The first search of a case times both kernels on its own full-size blocks (three blocks
    each, in the order torch, faiss, faiss, torch, torch, faiss; searches with fewer blocks
    repeat their first one), keeps the results, and picks faiss when its median block time is
    below ``AUTO_MARGIN`` (0.9) times torch's, so noise does not flip the choice. The choice is
    cached and logged once (logger ``ssl_lib.memory.search``, level INFO). ``auto`` is ``torch``
    without timing when faiss is not installed or cannot serve the device (CUDA without a GPU
    build of faiss, ``k > 2048`` on CUDA), when a block has fewer than ``AUTO_MIN_BLOCK_MACS``
    (2^24) multiply-adds (faiss's per-call overhead dominates and the timing is noise), and in a
    process group of more than one process: timings differ between processes, and processes
    must search alike. There :func:`choose_backend`, which every process calls at the same point
    (``SSLMethod.on_train_start`` does for each bank a training step searches), times on every
    process and applies rank 0's choice everywhere.

    Why time: on a 2-core CPU, for K = 131,072, D = 512, B = 256, k = 5, ``faiss.knn`` took
    191 ms against 338 ms for the bare matmul on an idle machine, but in the MSF bank step under
    load faiss cost 2.5-4.7x the matmul and torch 1.0-1.3x (faiss's OpenMP pool competes with
    PyTorch's); see ``benchmarks/README.md``. Choices may therefore differ between machines and
    runs; the backends agree up to the order of near-tied rows, so set ``torch`` or ``faiss``
    explicitly where a run must repeat bit for bit on another machine.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ssl_lib.distributed import all_gather_concat, comm_device, world_size

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss")
METRICS = ("ip", "l2")
AUTO_MARGIN = 0.9
AUTO_MIN_BLOCK_MACS = 2**24
FAISS_GPU_MAX_K = 2048
DEFAULT_QUERY_CHUNK = 1024
DEFAULT_BANK_CHUNK = 16384
# Order of the timed blocks: each backend runs first once and follows the other twice.
_TIMING_ORDER = ("torch", "faiss", "faiss", "torch", "torch", "faiss")
# Rows per step when validating features.
_ROW_CHUNK = 8192

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


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")


def row_chunks(x: Tensor, chunk: int) -> Iterator[tuple[int, Tensor]]:
    """``(first row, rows)`` of ``x`` in steps of ``chunk`` rows (views, no copies)."""
    for start in range(0, x.shape[0], chunk):
        yield start, x[start : start + chunk]


def check_features(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a non-empty 2-D floating-point tensor of finite values.

    The message names ``name`` and, for NaN or infinite values, the first bad row.
    """
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (rows x dim) tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    for start, rows in row_chunks(x, _ROW_CHUNK):
        bad = ~torch.isfinite(rows).all(dim=1)
        if bad.any():
            row = start + int(bad.nonzero()[0])
            raise ValueError(f"{name} contains NaN or infinite values (first at row {row})")


# --------------------------------------------------------------------------- the auto rule
@dataclass(frozen=True)
class SearchCase:
    """What the speed of a search depends on; the key under which ``auto``'s choice is kept.

    ``query_rows`` and ``chunk_rows`` are the rows of one full block (the first query chunk and
    the first bank chunk).
    """

    device: str
    bank_rows: int
    dim: int
    dtype: str
    query_rows: int
    chunk_rows: int
    k: int
    metric: str

    @classmethod
    def of(
        cls,
        bank: Tensor,
        num_queries: int,
        k: int,
        device: torch.device,
        chunk_size: int,
        query_chunk: int | None,
        metric: str,
    ) -> SearchCase:
        """The case of searching ``num_queries`` queries on ``device`` in ``bank``."""
        rows, dim = bank.shape
        query_rows = num_queries if query_chunk is None else min(num_queries, query_chunk)
        dtype = str(bank.dtype).removeprefix("torch.")
        return cls(str(device), rows, dim, dtype, query_rows, min(rows, chunk_size), k, metric)

    @property
    def block_macs(self) -> int:
        """Multiply-adds of one full block."""
        return self.query_rows * self.chunk_rows * self.dim

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"{self.query_rows} queries x {self.bank_rows} rows x {self.dim} dims "
            f"({self.dtype}, chunks of {self.chunk_rows}), k={self.k}, metric={self.metric}, "
            f"{self.device}"
        )


_CHOICES: dict[SearchCase, str] = {}
_NOTED: set[SearchCase] = set()


def _faiss_unusable(device: torch.device, k: int) -> str | None:
    """Why faiss cannot run this search, or ``None`` when it can."""
    if not faiss_available():
        return "needs the faiss package (faiss-cpu, or faiss-gpu for CUDA tensors)"
    if device.type == "cuda":
        if not faiss_gpu_available():
            return "on CUDA tensors needs a GPU build of faiss"
        if k > FAISS_GPU_MAX_K:
            return f"on CUDA supports k <= {FAISS_GPU_MAX_K} (faiss's GPU limit), got k={k}"
    elif device.type != "cpu":
        return f"supports CPU or CUDA tensors, got {device}"
    return None


def resolve_backend(
    backend: str, case: SearchCase, *, masked: bool = False, may_time: bool | None = None
) -> str | None:
    """The backend a search of ``case`` runs: ``"torch"``, ``"faiss"``, or ``None`` when
    ``auto`` has to be timed first (see the module docstring for the rule).

    ``may_time`` (default: True in a single process) says whether this process may time on its
    own. Raises ``ValueError`` for an unknown backend, or for ``faiss`` where faiss cannot run
    (not installed, CUDA tensors without a GPU build, ``k > 2048`` on CUDA, another device).
    Constrained (``masked``) searches always run torch.
    """
    check_backend(backend)
    if backend == "torch" or masked:
        return "torch"
    why_not = _faiss_unusable(torch.device(case.device), case.k)
    if backend == "faiss":
        if why_not:
            raise ValueError(f"backend 'faiss' {why_not}")
        return "faiss"
    if why_not or case.block_macs < AUTO_MIN_BLOCK_MACS:
        return "torch"
    if case in _CHOICES:
        return _CHOICES[case]
    if may_time is None:
        may_time = world_size() == 1
    if may_time:
        return None
    if case not in _NOTED:
        _NOTED.add(case)
        log.info(
            "search backend auto for %s: torch (%d processes and no choice made by "
            "choose_backend, which all processes call together)",
            case.describe(),
            world_size(),
        )
    return "torch"


def _remember(case: SearchCase, name: str, times: dict[str, list[float]], note: str = "") -> None:
    _CHOICES[case] = name
    if times["torch"]:
        ms = {b: f"{1e3 * statistics.median(t):.2f}" for b, t in times.items()}
        how = f"median ms per block: torch {ms['torch']}, faiss {ms['faiss']}"
    else:
        how = "not timed"
    log.info("search backend auto for %s: %s (%s)%s", case.describe(), name, how, note)


# --------------------------------------------------------------------------- kernels
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


def _scores(q: Tensor, rows: Tensor, metric: str) -> Tensor:
    """Ranking scores ``B x R``: ``q . r``, or ``q . r - |r|^2 / 2`` for ``l2`` (same order as
    ``-|q - r|^2`` for a fixed query; :func:`_select` converts the kept ones)."""
    scores = torch.mm(q, rows.T, out=_score_buffer(q.shape[0], rows.shape[0], q.device))
    if metric == "l2":
        scores.sub_(0.5 * rows.square().sum(dim=1))
    return scores


def _top(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` per row; for ``k = 1`` the first maximum (lowest column) like ``argmax``."""
    if k == 1:
        return values.max(dim=1, keepdim=True)
    return values.topk(k, dim=1)


def _select(scores: Tensor, k: int, q: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Top-``k`` of a score block as (similarities, columns)."""
    values, idx = _top(scores, k)
    if metric == "l2":
        values = 2 * values - q.square().sum(dim=1, keepdim=True)
    return values, idx


def _torch_kernel(q: Tensor, rows: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    return _select(_scores(q, rows, metric), k, q, metric)


def _faiss_metric(metric: str):
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _faiss_cpu_kernel(q: Tensor, rows: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    import faiss

    sims, idx = faiss.knn(
        q.contiguous().numpy(), rows.contiguous().numpy(), k, metric=_faiss_metric(metric)
    )
    sims = torch.from_numpy(sims)
    return (sims if metric == "ip" else sims.neg_()), torch.from_numpy(idx)


@functools.cache
def _gpu_resources():
    import faiss

    return faiss.StandardGpuResources()


def _faiss_gpu_kernel(q: Tensor, rows: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    # Not run by the test suite (no GPU build of faiss on its machine).
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take CUDA tensors in place)

    sims = torch.empty(q.shape[0], k, device=q.device, dtype=torch.float32)
    idx = torch.empty(q.shape[0], k, device=q.device, dtype=torch.int64)
    gpu = q.device.index if q.device.index is not None else torch.cuda.current_device()
    faiss.knn_gpu(
        _gpu_resources(),
        q.contiguous(),
        rows.contiguous(),
        k,
        D=sims,
        I=idx,
        metric=_faiss_metric(metric),
        device=gpu,
    )
    return (sims if metric == "ip" else sims.neg_()), idx


def _kernel(name: str, device: torch.device) -> Callable[..., tuple[Tensor, Tensor]]:
    if name == "torch":
        return _torch_kernel
    return _faiss_gpu_kernel if device.type == "cuda" else _faiss_cpu_kernel


# --------------------------------------------------------------------------- the search loop
class _RunningTopK:
    """Top-``k`` (largest) over column blocks seen one after another."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: Tensor | None = None
        self.indices: Tensor | None = None

    def add(self, values: Tensor, indices: Tensor) -> None:
        if self.values is None:
            self.values, self.indices = values, indices
            return
        values = torch.cat([self.values, values], dim=1)
        indices = torch.cat([self.indices, indices], dim=1)
        self.values, pos = _top(values, min(self.k, values.shape[1]))
        self.indices = indices.gather(1, pos)


class _Kernels:
    """Which kernel computes each unmasked block; times both while ``auto`` is undecided."""

    def __init__(self, name: str | None, full: tuple[int, int], device: torch.device) -> None:
        self.name = name
        self.full = full
        self.device = device
        self.todo = list(_TIMING_ORDER) if name is None else []
        self.times: dict[str, list[float]] = {"torch": [], "faiss": []}
        self.first: tuple[Tensor, Tensor, int, str] | None = None

    def run(self, q: Tensor, rows: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
        if not self.todo or (q.shape[0], rows.shape[0]) != self.full:
            return _kernel(self.name or "torch", self.device)(q, rows, k, metric)
        if self.first is None:
            self.first = (q, rows, k, metric)
        return self._timed(self.todo.pop(0), q, rows, k, metric)

    def _timed(self, name: str, q: Tensor, rows: Tensor, k: int, metric: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = _kernel(name, self.device)(q, rows, k, metric)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.times[name].append(time.perf_counter() - start)
        if not self.todo:
            self.name = self.decide()
        return out

    def finish(self) -> None:
        """Complete the timing on the first full block when the search had too few of them."""
        while self.todo:
            self._timed(self.todo.pop(0), *self.first)

    def decide(self) -> str:
        torch_s = statistics.median(self.times["torch"])
        faiss_s = statistics.median(self.times["faiss"])
        return "faiss" if faiss_s < AUTO_MARGIN * torch_s else "torch"


Block = tuple  # (first row, float32 rows on the queries' device[, bool mask])


def _run(
    blocks: Iterable[Block],
    q: Tensor,
    k: int,
    *,
    query_chunk: int | None,
    kernels: _Kernels,
    metric: str = "ip",
    keep_disallowed: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Running top-``k`` of ``q`` over ``blocks``.

    A block's optional mask is bool, ``(rows,)`` for every query or ``(Q, rows)``; masked
    blocks are scored by torch, with disallowed rows at -inf. Returns ``(values, indices,
    other_values, other_indices)``: the top-``k`` allowed rows (slots without one have value
    -inf and an arbitrary row index) and, with ``keep_disallowed``, the top-``k`` disallowed
    rows (else ``None``).
    """
    step = q.shape[0] if query_chunk is None else query_chunk
    spans = [(a, min(a + step, q.shape[0])) for a in range(0, q.shape[0], step)]
    allowed = [_RunningTopK(k) for _ in spans]
    others = [_RunningTopK(k) for _ in spans] if keep_disallowed else None
    neg_inf = float("-inf")
    for start, rows, *mask in blocks:
        kk = min(k, rows.shape[0])
        for j, (a, b) in enumerate(spans):
            qj = q[a:b]
            if not mask:
                values, idx = kernels.run(qj, rows, kk, metric)
                allowed[j].add(values, idx + start)
                continue
            m = mask[0]
            m = (m[a:b] if m.dim() == 2 else m.view(1, -1)).to(q.device)
            scores = _scores(qj, rows, metric)
            values, idx = _select(scores.masked_fill(~m, neg_inf), kk, qj, metric)
            allowed[j].add(values, idx + start)
            if others is not None:
                values, idx = _select(scores.masked_fill(m, neg_inf), kk, qj, metric)
                others[j].add(values, idx + start)
    if allowed[0].values is None:
        raise ValueError("the search got no bank rows")
    kernels.finish()

    def cat(tops: list[_RunningTopK]) -> tuple[Tensor, Tensor]:
        return torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])

    values, indices = cat(allowed)
    other_values, other_indices = cat(others) if others is not None else (None, None)
    return values, indices, other_values, other_indices


def _bank_blocks(bank: Tensor, chunk_size: int, device: torch.device, mask_fn: MaskFn | None):
    for start, rows in row_chunks(bank, chunk_size):
        rows = rows.to(device, torch.float32)
        if mask_fn is None:
            yield start, rows
        else:
            yield start, rows, mask_fn(start, start + rows.shape[0])


def _check_search_args(bank: Tensor, queries: Tensor, k: int, chunk_size: int, query_chunk, metric):
    num_rows, dim = bank.shape
    if not 1 <= k <= num_rows:
        raise ValueError(f"k must be in [1, {num_rows}] (the bank size), got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if query_chunk is not None and query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    if queries.dim() != 2 or queries.shape[1] != dim:
        raise ValueError(
            f"queries must have shape (B, {dim}), got {tuple(queries.shape)} "
            f"(expected dim {dim}, actual {queries.shape[-1]})"
        )


def _search(
    bank: Tensor,
    queries: Tensor,
    k: int,
    backend: str,
    chunk_size: int,
    query_chunk: int | None,
    mask_fn: MaskFn | None,
    strict: bool,
    metric: str,
    may_time: bool | None,
) -> tuple[SearchResult, _Kernels, SearchCase]:
    _check_search_args(bank, queries, k, chunk_size, query_chunk, metric)
    q = queries.detach().float().contiguous()
    case = SearchCase.of(bank, q.shape[0], k, q.device, chunk_size, query_chunk, metric)
    name = resolve_backend(backend, case, masked=mask_fn is not None, may_time=may_time)
    kernels = _Kernels(name, (case.query_rows, case.chunk_rows), q.device)
    blocks = _bank_blocks(bank, chunk_size, q.device, mask_fn)
    values, indices, other_values, other_indices = _run(
        blocks,
        q,
        k,
        query_chunk=query_chunk,
        kernels=kernels,
        metric=metric,
        keep_disallowed=mask_fn is not None and not strict,
    )
    result = _result(values, indices, other_values, other_indices, masked=mask_fn is not None)
    return result, kernels, case


def _result(
    values: Tensor,
    indices: Tensor,
    other_values: Tensor | None,
    other_indices: Tensor | None,
    masked: bool,
) -> SearchResult:
    """Assemble the result of :func:`_run`: strict when there are no disallowed rows kept."""
    if not masked:
        return SearchResult(values, indices, torch.ones_like(indices, dtype=torch.bool))
    valid = torch.isfinite(values)
    if other_values is None:
        return SearchResult(values, indices.masked_fill(~valid, -1), valid)
    # Slot j takes the j-th allowed row while there are any, then the (j - n_valid)-th other row.
    k = values.shape[1]
    n_valid = valid.sum(dim=1, keepdim=True)
    slot = torch.arange(k, device=values.device).expand_as(valid)
    pick = torch.where(slot < n_valid, slot, slot - n_valid + k)
    sims = torch.cat([values, other_values], dim=1).gather(1, pick)
    idx = torch.cat([indices, other_indices], dim=1).gather(1, pick)
    return SearchResult(sims, idx, slot < n_valid)


@torch.no_grad()
def search(
    bank: Tensor,
    queries: Tensor,
    k: int,
    *,
    backend: str = "auto",
    chunk_size: int = 65536,
    query_chunk: int | None = None,
    mask_fn: MaskFn | None = None,
    strict: bool = False,
    metric: str = "ip",
) -> SearchResult:
    """Exact top-``k`` search of ``queries`` (B x D, any float dtype) in ``bank`` (K x D).

    Chunking, devices, backends and the ``auto`` rule are described in the module docstring;
    results (float32 scores, int64 row indices, ``B x k``) are on the queries' device and carry
    no gradient. ``mask_fn`` restricts the allowed rows per query (see :class:`Constraint` for
    the ranking of disallowed rows and ``strict``); masked searches run torch. Raises
    ``ValueError`` for ``k`` outside ``[1, K]``, non-positive chunk sizes, a dimension
    mismatch, an unknown backend or metric, or ``faiss`` where it cannot run.
    """
    result, kernels, case = _search(
        bank, queries, k, backend, chunk_size, query_chunk, mask_fn, strict, metric, None
    )
    if kernels.times["torch"]:
        _remember(case, kernels.name, kernels.times)
    return result


@torch.no_grad()
def choose_backend(
    bank: Tensor,
    num_queries: int,
    k: int,
    *,
    backend: str = "auto",
    chunk_size: int = 65536,
    query_chunk: int | None = None,
    metric: str = "ip",
) -> str:
    """Settle ``backend`` for searches of ``num_queries`` queries for ``k`` rows of ``bank``.

    For ``auto`` the two kernels are timed now on ``bank``'s own rows as queries (unless the
    rule settles it without timing) and the choice is cached for later searches of this case.
    In a process group of more than one process this is a collective: every process must call
    it at the same point with the same arguments; each times on its own and rank 0's choice is
    applied everywhere. Returns ``"torch"`` or ``"faiss"``; raises like :func:`search`.
    """
    check_backend(backend)
    device = bank.device
    case = SearchCase.of(bank, num_queries, k, device, chunk_size, query_chunk, metric)
    name = resolve_backend(backend, case, may_time=True)
    times: dict[str, list[float]] = {"torch": [], "faiss": []}
    if name is None:
        rows = torch.arange(num_queries, device=device) % bank.shape[0]
        _, kernels, _ = _search(
            bank, bank[rows], k, backend, chunk_size, query_chunk, None, False, metric, True
        )
        name, times = kernels.name, kernels.times
    if backend == "auto" and world_size() > 1:
        # One collective on every process, whatever each decided locally.
        usable = _faiss_unusable(device, k) is None
        mine = torch.tensor([[name == "faiss", usable]], device=comm_device())
        flags = all_gather_concat(mine)
        name = "faiss" if bool(flags[0, 0]) and bool(flags[:, 1].all()) else "torch"
        note = f"; rank 0's timing decides for all {world_size()} processes"
        _remember(case, name, times, note)
    elif times["torch"]:
        _remember(case, name, times)
    return name


@torch.no_grad()
def search_blocks(blocks: Iterable[tuple], queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of ``queries`` over rows given block by block (torch).

    ``blocks`` yields ``(first_row, rows)`` or ``(first_row, rows, allowed)``: float32 rows,
    e.g. assembled on the fly from a cache that is never materialised whole (CMSF-2Q's second
    bank), and optionally a bool vector marking the rows that may be returned. Rows are moved
    to the queries' device. Returns ``(similarities, indices)`` (B x k, descending); slots
    without an allowed row have similarity -inf and an arbitrary (valid) row index. ``k``
    larger than the number of rows returns all rows.
    """
    q = queries.detach().float().contiguous()

    def on_device() -> Iterator[Block]:
        for start, rows, *allowed in blocks:
            yield (start, rows.to(q.device, torch.float32), *allowed)

    kernels = _Kernels("torch", (0, 0), q.device)
    values, indices, _, _ = _run(on_device(), q, k, query_chunk=None, kernels=kernels)
    return values, indices


def knn_topk(
    bank: Tensor,
    queries: Tensor,
    k: int,
    *,
    backend: str = "auto",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner-product search of offline features: :func:`search` after checks.

    ``bank`` (N x D) and ``queries`` (Q x D) are floating-point features, checked to be 2-D,
    non-empty and finite; rows should be L2-normalised so that scores are cosine similarities
    (they are not renormalised here). The bank may be float16/bfloat16 and may live on the CPU
    while the queries live on a GPU. Returns ``(sims, idx)`` on the queries' device, float32
    and int64 of shape ``Q x k``, sorted by decreasing similarity. Raises ``ValueError`` for
    bad features, mismatched dimensions, ``k`` outside ``[1, N]``, non-positive chunk sizes
    or an unusable backend.
    """
    check_features(bank, "bank")
    check_features(queries, "queries")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: bank has {bank.shape[1]}, queries have {queries.shape[1]}"
        )
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the bank size ({bank.shape[0]} rows)")
    if query_chunk < 1 or bank_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got {query_chunk=} {bank_chunk=}")
    result = search(
        bank, queries, k, backend=backend, chunk_size=bank_chunk, query_chunk=query_chunk
    )
    return result.similarities, result.indices
