"""Ring-buffer memory bank of embeddings with integer payloads and exact k-NN search."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_lib.distributed import all_gather_concat
from ssl_lib.memory.search import (
    Constraint,
    SearchResult,
    check_backend,
    choose_backend,
    search,
)
from ssl_lib.undo import Undoable

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
INITS = ("normal", "zeros")


def _storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(
            f"unsupported dtype {dtype}; accepted: torch.float32, torch.float16, torch.bfloat16"
        )
    return dtype


class MemoryBank(nn.Module, Undoable):
    """FIFO bank of ``size`` embeddings of width ``dim`` plus int64 payload columns.

    * All state (``embeddings``, one int64 buffer per payload, ``ptr``, ``num_seen``) is held in
      persistent buffers, so it is saved and restored by ``state_dict`` / Lightning checkpoints.
    * :meth:`enqueue` all-gathers its inputs across ranks (rank order) before writing, so every
      rank holds the same bank; every rank must enqueue batches of the same size.
    * Writes wrap around the ring with any batch size; a batch larger than the bank keeps its last
      ``size`` rows, in ring order.
    * Storage may be fp32/fp16/bf16; reads (:meth:`gather`) and search arithmetic are float32.
    * Initial rows are L2-normalised Gaussian vectors drawn from a generator seeded with ``seed``
      (identical on every rank without communication), or zeros with ``init="zeros"``.
      Payloads start at -1.

    The bank stores rows as given; callers enqueue L2-normalised embeddings so that the
    inner-product search of :meth:`knn` is a cosine-similarity search.
    """

    embeddings: Tensor
    ptr: Tensor
    num_seen: Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        payloads: Sequence[str] = ("labels",),
        dtype: torch.dtype | str = torch.float32,
        backend: str = "auto",
        chunk_size: int = 65536,
        init: str = "normal",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be >= 1, got size={size}, dim={dim}")
        check_backend(backend)
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        reserved = {"embeddings", "ptr", "num_seen"}
        bad = [p for p in payloads if not p.isidentifier() or p in reserved]
        if bad or len(set(payloads)) != len(payloads):
            raise ValueError(
                f"payload names must be distinct identifiers other than {sorted(reserved)}, "
                f"got {list(payloads)}"
            )
        self.size = size
        self.dim = dim
        self.payload_names = tuple(payloads)
        self.backend = backend
        self.chunk_size = chunk_size
        self.init = init
        self.seed = seed
        dt = _storage_dtype(dtype)
        self.register_buffer("embeddings", torch.empty(size, dim, dtype=dt))
        for name in self.payload_names:
            self.register_buffer(name, torch.empty(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))
        self._journal: list[tuple] | None = None
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Re-initialise rows and payloads and rewind the pointer."""
        if self.init == "zeros":
            self.embeddings.zero_()
        else:
            gen = torch.Generator().manual_seed(self.seed)
            rows = torch.randn(self.size, self.dim, generator=gen)
            self.embeddings.copy_(nn.functional.normalize(rows, dim=1))
        for name in self.payload_names:
            self.payload(name).fill_(-1)
        self.ptr.zero_()
        self.num_seen.zero_()

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the embeddings."""
        return self.embeddings.dtype

    def payload(self, name: str) -> Tensor:
        """The int64 payload buffer ``name`` (length ``size``)."""
        if name not in self.payload_names:
            accepted = ", ".join(self.payload_names) or "none"
            raise ValueError(f"unknown payload {name!r}; accepted: {accepted}")
        return getattr(self, name)

    def _check_dim(self, x: Tensor, what: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"{what} must have shape (B, {self.dim}): expected dim {self.dim}, "
                f"got shape {tuple(x.shape)}"
            )

    @torch.no_grad()
    def enqueue(self, x: Tensor, *, gathered: bool = False, **payloads: Tensor) -> None:
        """Write the rows of ``x`` (and payload values) at the pointer, gathered over all ranks.

        Payloads not given are written as -1. Nothing is dropped: the pointer wraps around and a
        batch larger than the bank leaves its last ``size`` rows. Under DDP every rank must call
        this with the same batch size and the same payload names (each is one collective).
        ``gathered=True`` means the caller already holds the global rows, identical on every rank
        (e.g. a selection of an all-gathered batch): they are written without communication.
        """
        self._check_dim(x, "enqueued embeddings")
        n_local = x.shape[0]
        for name, values in payloads.items():
            if name not in self.payload_names:
                self.payload(name)  # raises the error listing accepted names
            if values.shape != (n_local,):
                raise ValueError(
                    f"payload {name!r} must have shape ({n_local},), got {tuple(values.shape)}"
                )
        gather = (lambda t: t.detach()) if gathered else all_gather_concat
        x = gather(x)
        n = x.shape[0]
        keep = min(n, self.size)
        ptr = int(self.ptr)
        start = (ptr + n - keep) % self.size
        if self._journal is not None:
            self._remember(start, keep)
        self._ring_write(self.embeddings, x[n - keep :], start)
        for name in self.payload_names:
            if name in payloads:
                values = gather(payloads[name])[n - keep :]
            else:
                values = torch.full((keep,), -1, dtype=torch.long, device=self.ptr.device)
            self._ring_write(self.payload(name), values, start)
        self.ptr.fill_((ptr + n) % self.size)
        self.num_seen.add_(n)

    def record_undo(self) -> None:
        """Start remembering what :meth:`enqueue` overwrites, so :meth:`stop_undo` can revert it."""
        self._journal = []

    @torch.no_grad()
    def stop_undo(self, revert: bool) -> None:
        """Stop remembering writes; with ``revert`` restore the bank as it was at
        :meth:`record_undo` (rows, payloads, pointer and count)."""
        journal, self._journal = self._journal, None
        if not revert or not journal:
            return
        for rows, old in reversed(journal):
            for name, values in old.items():
                buf = getattr(self, name)
                if rows is None:
                    buf.copy_(values)
                else:
                    buf[rows] = values

    def _remember(self, start: int, keep: int) -> None:
        rows = (start + torch.arange(keep, device=self.ptr.device)) % self.size
        names = ("embeddings", *self.payload_names)
        old = {name: getattr(self, name)[rows].clone() for name in names}
        self._journal.append((rows, old))  # type: ignore[union-attr]
        counters = {"ptr": self.ptr.clone(), "num_seen": self.num_seen.clone()}
        self._journal.append((None, counters))  # type: ignore[union-attr]

    def _ring_write(self, buf: Tensor, rows: Tensor, start: int) -> None:
        first = min(rows.shape[0], self.size - start)
        buf[start : start + first].copy_(rows[:first])
        buf[: rows.shape[0] - first].copy_(rows[first:])

    def search(self, queries: Tensor, k: int, constraint: Constraint | None = None) -> SearchResult:
        """Exact top-``k`` inner-product search returning a :class:`SearchResult`.

        With a constraint, ``SearchResult.valid`` / ``num_short`` tell which slots satisfy it
        (see :class:`~ssl_lib.memory.search.Constraint` for the fewer-than-k rule).
        """
        self._check_dim(queries, "queries")
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be in [1, {self.size}] (the bank size), got {k}")
        mask_fn = None
        strict = False
        if constraint is not None:
            for name in constraint.payload_names():
                self.payload(name)
            if constraint.num_queries != queries.shape[0]:
                raise ValueError(
                    f"constraint is defined for {constraint.num_queries} queries, "
                    f"got {queries.shape[0]}"
                )
            constraint.check(self.size)
            columns = {name: self.payload(name) for name in self.payload_names}

            def mask_fn(start: int, end: int) -> Tensor:
                return constraint.chunk_mask(columns, start, end)

            strict = constraint.strict
        return search(
            self.embeddings,
            queries,
            k,
            backend=self.backend,
            chunk_size=self.chunk_size,
            mask_fn=mask_fn,
            strict=strict,
        )

    def choose_backend(self, num_queries: int, k: int) -> str:
        """Settle the search backend for ``num_queries`` queries and ``k`` neighbours now.

        With ``backend="auto"`` the kernels are timed on the bank's own rows (see
        :func:`~ssl_lib.memory.search.choose_backend`), and later searches of that shape use the
        choice. Under DDP this is a collective that every rank must call at the same point;
        rank 0's choice applies everywhere. Returns ``"torch"`` or ``"faiss"``.
        """
        return choose_backend(
            self.embeddings, num_queries, k, backend=self.backend, chunk_size=self.chunk_size
        )

    def knn(
        self, queries: Tensor, k: int, constraint: Constraint | None = None
    ) -> tuple[Tensor, Tensor]:
        """Top-``k`` bank rows by inner product (cosine for L2-normalised rows and queries).

        Returns ``(similarities, indices)``: float32 and int64, ``B x k``, sorted by descending
        similarity (constrained searches: allowed rows first, see :meth:`search`).
        """
        result = self.search(queries, k, constraint)
        return result.similarities, result.indices

    def gather(self, indices: Tensor) -> Tensor:
        """Rows at ``indices`` (any shape) as float32, shape ``(*indices.shape, dim)``."""
        if indices.numel() and bool((indices < 0).any()):
            raise ValueError(
                "gather got negative indices (index -1 marks a missing neighbour in strict "
                "constrained search); mask those slots before gathering"
            )
        return self.embeddings[indices].float()

    def __getitem__(self, indices: Tensor) -> Tensor:
        return self.gather(indices)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.dtype}, "
            f"payloads={self.payload_names}, backend={self.backend!r}, "
            f"chunk_size={self.chunk_size}, init={self.init!r}"
        )
