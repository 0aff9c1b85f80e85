"""What an engine process runs before it serves: its process set-up, the model, the warm-up and
the capacity measurement. Used alike by the engine process (engine/process.py) and by an engine
in the caller's process (`Engine.start(process=False)`: tests, benchmarks, notebooks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine import families
from engine.backends import PaddedBatch, default_batch_tokens, forward, load_backend
from engine.batcher import Batcher, BatchStats
from engine.cost import padded_cost

log = logging.getLogger(__name__)

#: How long the capacity measurement may take at start (at least one full-budget pass is timed).
CAPACITY_SECONDS = 2.0

#: OpenMP threads spin for ~300k iterations after each parallel region by default; on a CPU host
#: sharing its cores between the engine, the feeders, Redis and often the API, that spinning
#: steals the CPU the reply path needs: 10k spins cut 3-4 ms off a 1-document call on 2 cores and
#: left model speed unchanged. Must be in the environment before torch loads libgomp.
GOMP_SPINCOUNT = "10000"


def limit_openmp_spinning() -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


#: Entries each of the two per-shape kernel caches of torch's oneDNN path keeps (docs/cpu.md,
#: "Memory under varied load"): about half a MiB each on tiny, 2 MiB per shape on base.
KERNEL_CACHE_ENTRIES = "64"


def bound_kernel_caches() -> None:
    """Bound the caches that grow with the number of batch shapes on a CPU's bf16 path.

    bf16 matrix multiplications go through oneDNN, which builds a kernel per input shape (rows x
    width varies with every batch: hundreds of shapes) and keeps it in two caches of 1024 entries
    by default: oneDNN's primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep's
    (`LRU_CACHE_CAPACITY`). Full, they held about 860 MiB on the tiny model (bench/cpu_memory.py):
    a plateau, not a leak, but more than a small box should give. Both read their variable when
    first used, so this works even after torch is imported, as long as no bf16 matmul ran yet;
    a value set in the environment wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_ENTRIES)
    os.environ.setdefault("LRU_CACHE_CAPACITY", KERNEL_CACHE_ENTRIES)


def configure_engine_process(config) -> None:
    """Logging and CPU threads of an engine process, before torch loads."""
    from shared.logs import setup_logging

    setup_logging(config.log_level, config.log_json)
    limit_openmp_spinning()
    if config.torch_threads and config.device != "sim":
        import torch

        torch.set_num_threads(config.torch_threads)


def settle(config):
    """The model's encoder (engine/families/), and the EngineConfig with the family and context
    length it settled on: the backend and the batcher must see those, wherever the engine runs
    (in the caller's process, a worker's own engine process, or a device's shared one)."""
    family = families.family_of(config.source, config.family)
    encoder = family.encoder(config.source, config.max_length, config.template)
    return encoder, dataclasses.replace(config, family=family.NAME, max_length=encoder.max_length)


def build_runtime(config, *, on_batch: Callable[[BatchStats], None] | None = None
                  ) -> tuple[Batcher, dict[str, Any]]:
    """Load the backend, warm it up, measure its capacity, start the batcher."""
    started = time.perf_counter()
    bound_kernel_caches()
    backend = load_backend(config)
    info = backend.describe()
    budget = config.max_batch_tokens or default_batch_tokens(str(info["device"]).split(":")[0])
    backend.warm_up(budget)
    info = backend.describe()  # after warm-up: graphs captured, their memory known
    capacity = measure_capacity(backend, budget, config.max_length)
    info.update(max_batch_tokens=budget, capacity=round(capacity, 1),
                warm_up_seconds=round(time.perf_counter() - started, 2), memory_mib=_resident_mib())
    log.info("engine ready: %s on %s (%s%s, %s: %s), %d tokens per batch, capacity %.0f tokens/s at full batches",
             config.source, info["device"], info.get("backend"),
             f" [{info['backend_reason']}]" if info.get("backend_reason") else "", info["dtype"],
             info.get("dtype_reason") or "as configured", budget, capacity)
    return Batcher(backend, max_batch_tokens=budget, on_batch=on_batch).start(), info


def measure_capacity(backend, budget: int, max_length: int, seconds: float = CAPACITY_SECONDS) -> float:
    """Padded-token cost the device scores per second at full batches.

    Timed on full-budget passes while the engine warms up, so its feeders announce what it can do
    before the first request: measured on small first calls instead, the pace looks tiny and the
    admission bound refuses a burst it could serve (docs/gpu.md#cold-start-and-the-admission-bound).
    """
    width = max(8, min(256, max_length))
    rows = max(1, int(budget // padded_cost(1, width)))
    rng = np.random.default_rng(0)
    batch = PaddedBatch(ids=rng.integers(5, 1000, size=(rows, width)).astype(np.int64),
                        lengths=np.full(rows, width, dtype=np.int32))
    forward(backend, batch)  # first pass: allocator and kernels warm
    passes, started = 0, time.perf_counter()
    while passes < 3 and (passes == 0 or time.perf_counter() - started < seconds):
        forward(backend, batch)
        passes += 1
    return padded_cost(rows, width) * passes / (time.perf_counter() - started)


def _resident_mib() -> float | None:
    """This process's resident memory (host side: the weights on a CPU, the runtime on a GPU)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
