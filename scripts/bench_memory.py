"""Memory, timer and CPU-usage readings of a bench worker process (peak RSS or CUDA allocation, rusage)."""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _vm_hwm_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _vm_rss_bytes() -> int | None:
    try:
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def peak_memory(device: str) -> int:
    """Peak memory of this process so far: CUDA allocated, else peak RSS."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_memory(device: str) -> bool:
    """Start a new peak-memory span; False where the platform cannot (then only the process peak is known)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def current_memory(device: str) -> int | None:
    if device == "cuda":
        import torch

        return int(torch.cuda.memory_allocated())
    return _vm_rss_bytes()


def timer(device: str) -> Callable[[], float]:
    """A clock in seconds that first waits for queued CUDA work (plain perf_counter on CPU)."""
    import torch

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def usage_since(before: resource.struct_rusage) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of this process since `before`.

    On a shared machine, CPU time close to threads x wall time means the step had its cores; many page faults
    mean the allocator handed memory back to the kernel and had it zeroed again.
    """
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, after.ru_minflt - before.ru_minflt
