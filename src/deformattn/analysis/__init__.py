"""What a model or a layer costs: parameters and multiply-adds (:mod:`~deformattn.analysis.flops`), and how one
attention layer's cost grows with the map (:mod:`~deformattn.analysis.complexity`). torch only; the figures are in
:mod:`deformattn.viz`."""
from __future__ import annotations

from .flops import CostReport, block_kind, count_flops, dmha_macs, flop_counter, format_cost_report, model_cost

__all__ = ["CostReport", "block_kind", "count_flops", "dmha_macs", "flop_counter", "format_cost_report", "model_cost"]
