"""``--llamabench-shard=i/N``: which configs run on this host.

The selected config names are sorted and dealt round robin: shard i of N runs the names at
sorted positions i-1, i-1+N, i-1+2N, ... Every host that loads the same matrix with the same
selection computes the same split, a config's restarts stay on one host, and the shards of
one split cover every config exactly once. Adding a config can move others to another shard
(the split is balanced, not hashed); compare reports of the same split.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from pytest_llamabench.errors import ConfigError

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str, where: str = "--llamabench-shard") -> Shard:
        match = _SPEC.match(text)
        index, count = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        if not match or count < 1 or not 1 <= index <= count:
            raise ConfigError(
                f"{where}: {text!r} is not a shard; write i/N with 1 <= i <= N (this host's share of N), "
                "e.g. 1/2 on the first host and 2/2 on the second"
            )
        return cls(index, count)

    def select(self, names: Sequence[str], where: str = "--llamabench-shard") -> list[str]:
        """The names of this shard, in the given order; an error when it would get none."""
        ordered = sorted(set(names))
        mine = set(ordered[self.index - 1::self.count])
        if not mine:
            raise ConfigError(
                f"{where}={self}: shard {self.index} of {self.count} gets no config: the selection has "
                f"{len(ordered)} ({', '.join(ordered) or 'none'}); use at most {max(len(ordered), 1)} shards"
            )
        return [n for n in names if n in mine]

    def as_dict(self, configs: Sequence[str] = ()) -> dict[str, Any]:
        return {"index": self.index, "count": self.count, "configs": list(configs)}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


__all__ = ["Shard"]
