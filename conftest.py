"""This repository's own short form: ``pytest -m gpu --config=C7``.

The plugin itself only claims ``--llamabench-config`` (a bare ``--config`` in an
installed plugin would crash every project whose conftest defines one); here,
``--config`` is an alias that appends to the same destination.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("llamabench").addoption(
        "--config",
        action="append",
        dest="llamabench_config",
        default=None,
        metavar="NAME",
        help="short for --llamabench-config (this repository only)",
    )
