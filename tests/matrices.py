"""Matrix files written by tests: the one helper for a TOML snippet -> Matrix or its one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.config import load_matrix
from pytest_llamabench.errors import ConfigError

#: one model, a small context: what most snippets need around their configs and workloads
HEAD = '[models.m]\npath = "m.gguf"\n[defaults]\nmodel = "m"\nctx = 512\n'


def load_text(tmp_path: Path, text: str, head: str = HEAD, **kw: Any) -> Any:
    path = tmp_path / "m.toml"
    path.write_text(head + text)
    return load_matrix([path], **kw)


def config_error(tmp_path: Path, text: str, head: str = HEAD) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, head)
    return str(info.value)
