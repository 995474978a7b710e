"""Whether bfloat16 autocast pays off where a model runs.

On a GPU of the last generations, and on CPUs with BF16 instructions (AVX512-BF16, AMX), autocast
to bfloat16 runs the matmuls about 1.4x faster. On a CPU without them PyTorch emulates bfloat16,
and a training step becomes some 20x slower (measured on an AMD EPYC without AVX512-BF16: 42 s
instead of 2 s for a batch of 32 through multilingual-e5-small). So a bfloat16 request falls back
to float32 on such CPUs, with one warning, instead of silently costing the job hours.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor listed in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_has_bf16() -> bool:
    try:
        return bool(cpu_flags(Path("/proc/cpuinfo").read_text()) & BF16_CPU_FLAGS)
    except OSError:  # not Linux: assume the fast path is absent rather than risk the slow one
        return False


def use_bf16(requested: bool, device_type: str, setting: str) -> bool:
    """bfloat16 autocast when ``requested`` and the device runs it natively; ``setting`` names the
    config field for the warning."""
    if not requested or device_type != "cpu" or cpu_has_bf16():
        return requested
    _warn_once(setting)
    return False


@functools.cache
def _warn_once(setting: str) -> None:
    log.warning("%s asks for bfloat16, but this CPU has no BF16 instructions (avx512_bf16/amx_bf16), where "
                "bfloat16 is emulated and many times slower: running in float32", setting)
