"""Memory bank with exact (optionally constrained) nearest-neighbour search."""

from ssl_lib.memory.bank import MemoryBank
from ssl_lib.memory.search import (
    AllowedIndices,
    Constraint,
    SameCluster,
    SameLabel,
    SearchResult,
    search,
)

__all__ = [
    "AllowedIndices",
    "Constraint",
    "MemoryBank",
    "SameCluster",
    "SameLabel",
    "SearchResult",
    "search",
]
