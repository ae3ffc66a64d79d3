"""Lightning's FSDPStrategy on CPU processes (gloo), for the tests. Lightning 2.6.6 refuses
``strategy="fsdp"`` without a GPU accelerator ("The strategy `fsdp` requires a GPU accelerator"), and
past that check its wrapper hands torch's FSDP no device on a CPU, which torch 2.13 refuses ("FSDP
needs a non-CPU accelerator device"); given the CPU device, torch's FSDP runs on gloo. This subclass
(its type is not FSDPStrategy, so the connector's check passes) changes only that device, and with
``FSDP_REPORT_DIR`` set, each rank writes what it holds there once wrapped: the FSDP units, the base
model's parameter elements on this rank (its shard) and the coefficients' elements."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        report = os.environ.get("FSDP_REPORT_DIR")
        if report:
            coefficients = {id(p) for p in model.coefficients.parameters()}
            record = {
                "units": sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules()),
                "base_elements": sum(p.numel() for p in wrapped.parameters() if id(p) not in coefficients),
                "coefficient_elements": sum(p.numel() for p in model.coefficients.parameters()),
            }
            Path(report, f"rank{self.global_rank}.json").write_text(json.dumps(record))
        return wrapped
