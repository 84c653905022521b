"""Host-to-device copies that do not stall the host.

A copy from ordinary (pageable) host memory to a GPU waits until everything queued before
it on the stream has run, so building a step's small input tensors would wait for the
previous forward. Staged through pinned memory the copy is queued like a kernel and the
host goes on (``non_blocking=True``); PyTorch's pinned-memory cache keeps the staging
buffer alive until the copy is done. On the CPU this is a plain conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: torch.Tensor | Sequence[object], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``data`` as a ``dtype`` tensor on ``device``, without waiting for the device."""
    tensor = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
