"""The matrix's auto-fit searches: one item per config with ``search = {...}`` (``test_search[C7-search]``)."""

from __future__ import annotations

from collections.abc import Callable

from pytest_llamabench.search import SearchResult


def test_search(llama_search: Callable[[], SearchResult]) -> None:
    llama_search()
