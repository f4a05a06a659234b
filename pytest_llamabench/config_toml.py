"""Reading matrix TOML: the file itself and typed, located access to its tables.

Every error names the file and the dotted key and says how to fix it.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_llamabench.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: matrix file not found; check --llamabench-matrix") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a matrix file; name a .toml file in --llamabench-matrix") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the matrix file ({exc.strerror}); check its permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files must be saved as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


class Table:
    """A TOML table that remembers where it came from, for error messages."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if not self.where.endswith(":") else f"{self.where}{key}"

    def check_keys(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key.replace("-", "_"), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    f"{self.at(key)}: unknown key; {hint}allowed keys: {', '.join(allowed)}"
                )

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.at(key)}: expected {names}, got {type(value).__name__} {value!r}")
        return value

    def choice(self, key: str, choices: Sequence[str]) -> str | None:
        value: str | None = self.get(key, str)
        if value is not None and value not in choices:
            raise ConfigError(f"{self.at(key)}: {value!r} is not one of {', '.join(choices)}")
        return value

    def positive_int(self, key: str, default: int | None = None, minimum: int = 1) -> int | None:
        value: int | None = self.get(key, int, default)
        if value is not None and value < minimum:
            raise ConfigError(f"{self.at(key)}: must be an integer >= {minimum}, got {value}")
        return value

    def table(self, key: str) -> Table:
        return Table(self.get(key, dict, {}), self.at(key))

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self.get(key, (list, str), [])
        items = [value] if isinstance(value, str) else value
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ConfigError(f"{self.at(key)}[{i}]: expected a string, got {item!r}")
        return tuple(items)
