"""Search: the cheapest per-head pattern meeting a recall threshold, for one head or a model."""

from compact_search.patterns import HeadPattern
from compact_search.search.budget import BudgetTarget
from compact_search.search.head import optimize_head, solve_head
from compact_search.search.result import SearchResult, load_search_result
from compact_search.search.run import optimize_profile
from compact_search.search.study import SearchConfig, join_study

__all__ = [
    "BudgetTarget",
    "HeadPattern",
    "SearchConfig",
    "SearchResult",
    "load_search_result",
    "optimize_head",
    "join_study",
    "optimize_profile",
    "solve_head",
]
