"""Process memory: the peak a run reports, and handing freed memory back between layers."""

from __future__ import annotations

import ctypes
import resource
import sys
from typing import Any

import torch


def peak_memory(device: Any) -> dict[str, int]:
    """The process's peak resident memory so far (and the device's peak allocation on CUDA), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if getattr(device, "type", None) == "cuda":
        peak["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get on ``device`` (CUDA: free device memory; CPU on Linux:
    ``MemAvailable``), or None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and sys.platform.startswith("linux"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS. glibc keeps freed blocks below its
    (self-raising) mmap threshold in its heap, so a layer-by-layer run that frees a layer and
    allocates the next sees its RSS climb to twice what it uses; ``malloc_trim`` costs about a
    millisecond per layer. A no-op elsewhere."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (musl has none)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()
