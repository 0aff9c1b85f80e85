"""What a worker's tasks share: its engine, Redis, job storage, metrics and identity.

Built once in `python -m worker`, before the Celery consumer starts (the model is loaded and
warm before the first task is taken), and held by the Celery app, where the tasks' base class
finds it (worker/tasks.py): no module-level global.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from engine import Engine
from shared.feed import Feeder
from shared.jobs import JobStore
from shared.pending import PendingWork
from shared.settings import ModelSpec, Settings
from shared.storage import JobStorage
from worker.metrics import CharsPerToken, Pace, WorkerMetrics


@dataclass
class WorkerContext:
    spec: ModelSpec
    settings: Settings
    engine: Engine
    redis: redis.Redis
    job_store: JobStore
    job_storage: JobStorage
    metrics: WorkerMetrics
    pace: Pace
    chars_per_token: CharsPerToken
    pending: PendingWork
    feeder: Feeder | None = None  # set once the Celery app exists: it sends the next bulk pieces
    heartbeat: Any = None  # worker.heartbeat.Heartbeat, once started
    realtime_direct: bool = False  # its threads take calls from the direct path's list (worker/realtime_consumer.py)
    worker_id: str = field(default_factory=lambda: WorkerContext.new_id())

    @staticmethod
    def new_id() -> str:
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def describe(self) -> dict[str, object]:
        """The heartbeat's content: what the API and operators know of this worker."""
        info = self.engine.info
        return {
            "id": self.worker_id,
            "model": self.spec.name,
            "source": self.spec.source,
            "max_length": info["max_length"],
            # The model family (engine/families/): whether it takes an instruction, the context
            # it serves, and the template size the API prices calls with (api/admission.py).
            "family": info.get("family", "cross-encoder"),
            "instruction": bool(info.get("instruction", False)),
            "context_length": int(info.get("context_length", info["max_length"])),
            "template_tokens": info.get("template_tokens"),
            "device": str(info["device"]),
            "dtype": str(info["dtype"]),
            "dtype_reason": info.get("dtype_reason"),  # why DTYPE=auto chose it (engine/backends/cpu_dtype.py)
            "backend": info.get("backend"),
            "backend_reason": info.get("backend_reason"),  # on a CPU: why torch or OpenVINO (CPU_BACKEND)
            "simulated": bool(info.get("simulated", False)),
            "cuda_graphs": info.get("cuda_graphs", 0),
            "graph_memory_mib": info.get("graph_memory_mib"),
            "max_batch_tokens": info["max_batch_tokens"],
            # Padded-token cost per second at full batches, measured while warming up: the API
            # bounds pending work by it from the first request on (api/admission.py).
            "capacity": info["capacity"],
            "cost_per_second": self.pace.cost_per_second(),
            "pairs_per_second": self.pace.pairs_per_second(),
            "chars_per_token": round(self.chars_per_token.value, 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "engine_pid": info.get("pid"),
            # Several workers may feed one engine (ENGINE_SOCKET): the API counts engines by id.
            "engine_id": info.get("engine_id") or f"{socket.gethostname()}-{info.get('pid') or os.getpid()}",
            "engine_shared": bool(info.get("shared", False)),
            "engine_memory_mib": info.get("memory_mib"),
            "engine_connected": self.engine.connected,
            # Whether it takes synchronous calls from names.realtime_list: the API sends calls that
            # way only while every live worker of the model does (api/dispatch.py).
            "realtime_direct": self.realtime_direct,
        }
