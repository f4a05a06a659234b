"""The memory plan and roofline of one launch, as builtin-typed facts for the report.

``LaunchPlan.for_config`` reads the model's tensor table and plans the config before its
server starts (``line()`` is the "C2: needs ≈ … : will not fit" message); ``facts()`` puts the
prediction beside what the server reported in its log and what was measured (peak VRAM and
RSS, decode tok/s against the bandwidth roofline). A plan never stops a launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.model.plan import (
    MemoryPlan,
    PlanInputs,
    budget_of,
    compare,
    inputs_of,
    plan,
    reported_buffers,
    reported_fit,
)
from pytest_llamabench.model.roofline import mean_position, roofline
from pytest_llamabench.model.tensors import ModelTensors


@dataclasses.dataclass
class LaunchPlan:
    name: str
    model: ModelTensors
    inputs: PlanInputs
    plan: MemoryPlan
    gpu_index: int | None = None  # NVML index of the GPU the server uses (for its bandwidth)

    @classmethod
    def for_config(cls, config: Any, *, budget: int | None, gpu_memory: int | None = None,
                   gpu_index: int | None = None, ctx: int | None = None) -> LaunchPlan | None:  # fmt: skip
        """The plan of a ``ServerConfig``; None when its model cannot be read (the launch says why)."""
        try:
            path: Path = config.model.resolve()
            model = ModelTensors.from_gguf(path)
        except (LlamabenchError, OSError):
            return None
        if not isinstance(ctx if ctx is not None else config.server.get("ctx"), int):
            return None  # ctx = { host_memory_factor = … } is sized at launch
        inputs = inputs_of(config, ctx)
        limit, source = budget_of(budget, gpu_memory)
        try:
            memory_plan = plan(model, inputs, budget=limit, budget_source=source, host_budget=config.memory_limit)
            return cls(config.name, model, inputs, memory_plan, gpu_index)
        except (re.error, KeyError):  # a bad -ot regex or an unknown cache type: the launch says why
            return None

    def line(self) -> str:
        return self.plan.line(self.name)

    def facts(self, log: str = "", measured: Mapping[str, float | None] | None = None,
              workload: Mapping[str, Any] | None = None, gen_tok_s: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Predicted beside reported (the server's log) and measured; the roofline for ``workload``."""
        reported = reported_buffers(log)
        out: dict[str, Any] = {"plan": self.plan.as_dict(), "reported_mib": reported,
                               "compare": compare(self.plan, reported, measured or {})}  # fmt: skip
        if self.plan.fit or self.plan.fit_decides:  # --fit on: what fit itself chose, beside the prediction
            out["reported_fit"] = reported_fit(log)
        if workload is not None:
            out["roofline"] = self.roofline(workload).as_dict(gen_tok_s)
        return out

    def roofline(self, workload: Mapping[str, Any]) -> Any:
        from pytest_llamabench.hardware.bandwidth import gpu_bandwidth, host_bandwidth

        host, source = host_bandwidth()
        gpu = gpu_bandwidth(self.gpu_index or 0) if self.inputs.gpu else None
        return roofline(self.model, self.plan.placed or self.inputs, mean_position(workload), gpu_bandwidth=gpu, host_bandwidth=host,
                        host_source=source)  # fmt: skip


def gpu_memory_of(devices: Any) -> tuple[int | None, int | None]:
    """(total bytes, NVML index) of the first GPU of ``devices`` (or of NVML device 0)."""
    with contextlib.suppress(Exception):
        from pytest_llamabench.hardware.gpu import nvml_session

        index = devices[0].index if devices else 0
        with nvml_session() as nv:
            return int(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(index)).total), index
    return None, None


__all__ = ["LaunchPlan", "gpu_memory_of"]
