"""Moving what the host drew (masks, crop boxes, flips: drawn from a CPU generator so that the random stream
does not depend on the device) onto the device without making the host wait for the device's queue."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """`x` on `device`. From the CPU to a CUDA device the copy goes through pinned memory and does not block:
    a plain copy from pageable memory synchronises the stream, so the host could not queue the next kernels
    while the GPU works (`torch.cuda.set_sync_debug_mode` flags it). Elsewhere `x.to(device)`."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
