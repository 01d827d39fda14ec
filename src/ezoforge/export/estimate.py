"""`ezo plan`'s figures for export: a copy of the merged weights and each GGUF, written tensor by tensor."""
from __future__ import annotations

from ezoforge.sizing import DISK_BYTES_S, GIB, PROCESS_RAM_GIB, largest_shard


def estimate(plan, step: str) -> dict:
    sizes = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 weights + one f16 scale
    shard, _ = largest_shard(plan.recipe.model.name, plan.shape)
    written = plan.shape.params * (plan.merged_bytes() +
                                   sum(sizes[g] for g in plan.recipe.export.gguf))
    plan.sources["export"] = "model: a copy of the merged weights + each GGUF, written tensor by tensor"
    return {"gpu_gib": 0.0, "ram_gib": PROCESS_RAM_GIB + shard / GIB, "disk_gib": written / GIB,
            "hours": (plan.shape.params * 2 + written) / DISK_BYTES_S / 3600}
