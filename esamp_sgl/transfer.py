"""Host-to-device copies that never make the host wait for the GPU.

A copy from ordinary (pageable) host memory to CUDA makes PyTorch synchronize the stream: the
scheduler thread would stall until every queued kernel has run, which defeats SGLang's overlap
scheduler and lets training block decoding. Through pinned memory the copy is queued on the
current stream and the host goes on; PyTorch's caching host allocator keeps the pinned block
alive until the copy has run, and reuses it afterwards (no cudaHostAlloc per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[float] | Sequence[int] | torch.Tensor, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """``values`` (a host list or CPU tensor) as a ``dtype`` tensor on ``device``, queued on the
    current stream without a host sync on CUDA."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
