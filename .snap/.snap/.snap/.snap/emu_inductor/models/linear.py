"""QuantizedLinear on 2-D rows.

transformers calls every linear layer with [batch, seq, hidden] activations. The
emulation is per row along the last dim, so flattening the leading dims changes no
value; it gives torch.compile the 2-D graph the mxemu `linear` patterns are traced with
(with 3-D inputs only the weight-dequant + mm part matched, the NVFP4 / MX activation
QDQ stayed outside the fused op; measured with torch 2.13 on CPU).
"""

from __future__ import annotations

import torch

from ..reference import QuantizedLinear

__all__ = ["RowQuantizedLinear"]


class RowQuantizedLinear(QuantizedLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        lead = x.shape[:-1]
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_features)
