"""Which dtype `DTYPE=auto` runs a model in, and why (the reason is logged and announced).

On CUDA, float16 (the reference's fast path). On a CPU, bfloat16 where the CPU multiplies bf16
matrices natively (Intel AMX, or AVX-512 BF16: Sapphire Rapids and later, AMD Zen 4 and later),
float32 elsewhere: without those instructions bf16 is emulated and slower than float32. On the
2-core benchmark machine bf16 scores a 100-document FastGPT call about 4 times faster than
float32, within the fidelity figures of docs/cpu.md. `DTYPE=float32` keeps the reference path.

The instruction sets are read from torch (`torch.cpu._is_amx_tile_supported`,
`torch.cpu._is_avx512_bf16_supported`, which ask the CPU through cpuinfo), and from the kernel's
CPU flags where torch does not have the probe (older or newer releases renamed it).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

_NAMED = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DtypeChoice(NamedTuple):
    dtype: torch.dtype
    reason: str


def cpu_bf16_units() -> list[str]:
    """The CPU's native bf16 matrix instruction sets, as `lscpu` names them (empty: none)."""
    found = []
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    flags = _proc_cpu_flags()
    for flag, probe in probes:
        ask = getattr(torch.cpu, probe, None)
        try:
            present = bool(ask()) if ask is not None else flag in flags
        except Exception:  # noqa: BLE001 - a probe that fails says nothing; fall back to the flags
            present = flag in flags
        if present:
            found.append(flag)
    return found


def _proc_cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(name: str, device: torch.device) -> DtypeChoice:
    """The dtype `DTYPE` asks for on `device`, with the reason in words."""
    if name != "auto":
        return DtypeChoice(_NAMED[name], f"DTYPE={name}")
    if device.type == "cuda":
        return DtypeChoice(torch.float16, "auto: float16 on CUDA")
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"auto: float32 on {device.type}")
    units = cpu_bf16_units()
    if units:
        return DtypeChoice(torch.bfloat16, f"auto: bfloat16, the CPU has native bf16 matrix support "
                                           f"({', '.join(units)}); DTYPE=float32 for the reference path")
    return DtypeChoice(torch.float32, "auto: float32, the CPU has no native bf16 matrix support "
                                      "(no amx_bf16 or avx512_bf16)")
