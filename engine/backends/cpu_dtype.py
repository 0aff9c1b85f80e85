"""Which dtype a model runs in (`DTYPE`), and why: the reason is logged and announced.

`DTYPE=auto`: float16 on CUDA (the reference's fast path). On a CPU, bf16 where the CPU
multiplies bf16 matrices natively (Intel AMX, or AVX-512 BF16: Sapphire Rapids and later, AMD
Zen 4 and later), float32 elsewhere: without those instructions bf16 is emulated and slower than
float32. `DTYPE=float32` keeps the reference path.

bf16 on a CPU means bf16 matrix multiplications (`bf16_matmuls`): every `nn.Linear` of the model
holds bf16 weights and multiplies bf16 inputs (oneDNN accumulates in float32), while the residual
stream, layer norms, attention, the classification head's output and everything after it
(sigmoid, the chunk merge, sorting) stay float32. Measured on base (docs/cpu.md): as fast as
casting the whole model to bf16 (2.1 x float32 in CPU time at one thread), with a third of its
score error, since a whole-bf16 model rounds the residual stream to 8 bits of mantissa after
every layer.

The instruction sets are read from torch (`torch.cpu._is_amx_tile_supported`,
`torch.cpu._is_avx512_bf16_supported`, which ask the CPU through cpuinfo), and from the
kernel's CPU flags where a torch release lacks the probe.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

_NAMED = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Linear layers with this few outputs (a classification head's last projection) stay float32.
_HEAD_OUTPUTS = 8


class DtypeChoice(NamedTuple):
    dtype: torch.dtype  # what the model computes in, as announced
    reason: str
    load_dtype: torch.dtype  # what the weights are loaded in (float32 for bf16 matmuls on a CPU)

    @property
    def bf16_matmuls(self) -> bool:
        return self.dtype is torch.bfloat16 and self.load_dtype is torch.float32


def cpu_bf16_units() -> list[str]:
    """The CPU's native bf16 matrix instruction sets, as `lscpu` names them (empty: none)."""
    found = []
    flags = _proc_cpu_flags()
    for flag, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        ask = getattr(torch.cpu, probe, None)
        try:
            present = bool(ask()) if ask is not None else flag in flags
        except Exception:  # noqa: BLE001 - a probe that fails says nothing; the kernel's flags do
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
        dtype = _NAMED[name]
        if dtype is torch.bfloat16 and device.type == "cpu":
            return DtypeChoice(dtype, f"DTYPE={name}: bf16 matrix multiplications, float32 elsewhere", torch.float32)
        return DtypeChoice(dtype, f"DTYPE={name}", dtype)
    if device.type == "cuda":
        return DtypeChoice(torch.float16, "auto: float16 on CUDA", torch.float16)
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"auto: float32 on {device.type}", torch.float32)
    units = cpu_bf16_units()
    if units:
        return DtypeChoice(torch.bfloat16, f"auto: the CPU multiplies bf16 natively ({', '.join(units)}): bf16 "
                                           "matrix multiplications, float32 elsewhere; DTYPE=float32 for the "
                                           "reference path", torch.float32)
    return DtypeChoice(torch.float32, "auto: float32, the CPU has no native bf16 matrix support "
                                      "(no amx_bf16 or avx512_bf16)", torch.float32)


class Bf16Linear(torch.nn.Module):
    """`nn.Linear` with bf16 weights: the input is rounded to bf16 for the multiplication, and the
    output comes back float32 with a float32 bias, or, for a feed-forward up-projection
    (`bf16_output`: its output only goes through the activation into the next multiplication,
    which rounds it to bf16 anyway), stays bf16: the activation then runs on half the bytes.
    Measured on base: whole-bf16 speed, with the fidelity of float32 outputs everywhere."""

    def __init__(self, linear: torch.nn.Linear, bf16_output: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bf16_output = bf16_output
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = (torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False)
                     if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16_output:
            return F.linear(x.to(torch.bfloat16), self.weight, None if self.bias is None else self.bias.to(torch.bfloat16))
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


def bf16_matmuls(model: torch.nn.Module) -> int:
    """Swap every `nn.Linear` of a float32 model (but a head's last projection) for `Bf16Linear`;
    returns how many were swapped."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.out_features > _HEAD_OUTPUTS:
                setattr(module, name, Bf16Linear(child, bf16_output=child.out_features > child.in_features))
                swapped += 1
    return swapped
