"""The one settings object of the service, read from the environment.

The API, the workers and the launcher all read the same variables, so a model name, a queue name
or a limit can never mean one thing on one side and another on the other. Every variable is
documented in docs/configuration.md (tests/test_docs.py keeps the two in step); names follow FastGPT's seed server where it has one (`ACCESS_TOKEN`).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.families import CONTEXT_LENGTHS, FAMILIES, detect_folder  # JSON only: no numpy, no torch


class KnownModel(NamedTuple):
    source: str  # Hugging Face id
    limit: int  # longest input in tokens
    family: str  # engine/families/
    default_length: int  # max_length served when MODELS and MAX_LENGTH say nothing


#: The checkpoints we are built for, by the name MODELS may use (docs/models.md has the table).
KNOWN_MODELS: dict[str, KnownModel] = {
    "bge-reranker-base": KnownModel("BAAI/bge-reranker-base", 512, "cross-encoder", 512),
    "bge-reranker-large": KnownModel("BAAI/bge-reranker-large", 512, "cross-encoder", 512),
    "bge-reranker-v2-m3": KnownModel("BAAI/bge-reranker-v2-m3", 8192, "cross-encoder", 512),
    "qwen3-reranker-0.6b": KnownModel("Qwen/Qwen3-Reranker-0.6B", 32768, "qwen3", 8192),
    "qwen3-reranker-4b": KnownModel("Qwen/Qwen3-Reranker-4B", 32768, "qwen3", 8192),
    "qwen3-reranker-8b": KnownModel("Qwen/Qwen3-Reranker-8B", 32768, "qwen3", 8192),
    "bge-reranker-v2-gemma": KnownModel("BAAI/bge-reranker-v2-gemma", 8192, "gemma", 512),
}

#: Redis used when nothing says otherwise (the API or a worker started alone on a dev machine).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelSpec(BaseModel):
    """A served model: the name clients use, where the weights come from, how long an input may be."""

    name: str
    source: str
    max_length: int = Field(ge=8)
    family: str | None = Field(default=None, description="engine/families/; None: what config.json implies.")
    template: dict[str, str] | None = Field(default=None, description="The family's prompt strings overridden.")

    @field_validator("family")
    @classmethod
    def _family_is_known(cls, value: str | None) -> str | None:
        if value is not None and value not in FAMILIES:
            raise ValueError(f"family {value!r} is not one of {sorted(FAMILIES)}")
        return value

    @field_validator("name")
    @classmethod
    def _name_is_queue_safe(cls, value: str) -> str:
        # The name becomes part of queue names and Redis keys, so keep it to a tame alphabet.
        if not _NAME.match(value):
            raise ValueError(f"model name {value!r} must be letters, digits, '.', '_' or '-'")
        return value

    @property
    def aliases(self) -> set[str]:
        """Names a request may use for this model: ours and the Hugging Face id it maps to."""
        return {self.name, self.source}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, frozen=True, env_ignore_empty=True)

    # --- access -------------------------------------------------------------------------------
    access_token: SecretStr | None = Field(
        default=None, description="Bearer token(s), comma-separated for rotation; unset = open."
    )

    # --- where things are ---------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None, description="Broker and state store; unset = the launcher starts its own."
    )
    redis_master_name: str = Field(
        default="mymaster", description="With REDIS_URL=sentinel://…: the name the Sentinels know the master by."
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="Password of the Sentinels themselves (the master's is in REDIS_URL)."
    )
    redis_min_replicas: int | None = Field(
        default=None, ge=0,
        description="Replicas that must hold an accepted job before its 202; unset = 1 with Sentinel, else 0.",
    )
    redis_wait_timeout: float = Field(
        default=2.0, gt=0, description="Seconds an accepted job waits for REDIS_MIN_REPLICAS before a 503.",
    )
    data_dir: Path = Field(default=Path("data"), description="Local Redis data and job storage.")

    # --- models -------------------------------------------------------------------------------
    models: str = Field(
        default="bge-reranker-base",
        description="Served models: 'name[=source]' comma-separated, or a JSON list of objects.",
    )
    max_length: int | None = Field(
        default=None, ge=8,
        description="Default tokens per (query, document); unset = each model's own (512 for bge, 8192 for Qwen3).",
    )

    # --- HTTP ---------------------------------------------------------------------------------
    host: str = "0.0.0.0"
    port: int = Field(default=6006, ge=1, le=65535)
    api_workers: int = Field(default=2, ge=1, description="gunicorn processes.")
    api_connections: int = Field(
        default=1000, ge=1, description="Connections each gunicorn process holds at once (gevent)."
    )
    client_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a client may pause while sending or reading a request."
    )
    sync_timeout: float = Field(default=25.0, gt=0, description="Seconds before a sync call is 504.")
    realtime_path: Literal["direct", "celery"] = Field(
        default="direct", description="API: how a synchronous call reaches the workers. direct: its task as JSON "
                                      "on the model's Redis list, taken by the workers' realtime threads (used "
                                      "only while every live worker of the model takes it); celery: a Celery task.",
    )
    max_documents: int = Field(default=2048, ge=1)
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_chunks: int = Field(
        default=64, ge=1, le=4096,
        description="Most windows a chunked document is scored in (the default and the cap of a request's "
                    "max_chunks); beyond them its end is not scored and the answer says truncated.",
    )
    max_pending_tokens: int | None = Field(
        default=None, ge=1,
        description="Realtime work (padded tokens) pending per model before 429; unset = what the workers "
                    "score within SYNC_TIMEOUT.",
    )

    metrics_auth: bool = Field(default=False, description="Put /metrics behind the token too.")

    # --- bulk jobs ------------------------------------------------------------------------------
    jobs_url: str | None = Field(
        default=None, description="fsspec URL of job inputs and results; unset = DATA_DIR/jobs."
    )
    job_piece_pairs: int | None = Field(
        default=None, ge=1, description="Pairs per job piece; unset = about 1 s of model time."
    )
    job_ttl: int = Field(default=7 * 24 * 3600, ge=60, description="Seconds a finished job is kept.")
    max_job_bytes: int = Field(default=2 * 1024**3, ge=1024, description="Largest job upload.")
    job_input_prefixes: str | None = Field(
        default=None, description="URL prefixes a job may name as input_url, comma-separated; unset = none."
    )
    max_jobs_per_token: int = Field(
        default=20, ge=1, description="Jobs in flight (being uploaded, queued or running) per token."
    )
    max_stored_bytes_per_token: int = Field(
        default=20 * 1024**3, ge=0, description="Input bytes a token's kept jobs may hold; 0 = no limit."
    )

    # --- worker -------------------------------------------------------------------------------
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N, or sim (a simulated H100).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_batch_tokens: int | None = Field(
        default=None, ge=1, description="Padded tokens per forward pass; unset = by device."
    )
    engine_process: bool = Field(
        default=True, description="Run the model in a process of its own, apart from Celery and tokenizing."
    )
    cuda_graphs: bool = Field(default=True, description="Replay captured CUDA graphs for small batches.")
    cuda_graph_max_tokens: int = Field(
        default=8192, ge=16, description="Largest batch (padded tokens) that gets a CUDA graph."
    )
    sim_profile: Literal["base", "large", "v2-m3", "qwen3-0.6b", "qwen3-4b", "qwen3-8b"] | None = Field(
        default=None, description="DEVICE=sim: the H100 timing table; unset = the one matching the model."
    )
    worker_concurrency: int = Field(
        default=32, ge=1, description="Calls a worker handles at once: Celery threads, and as many threads taking "
                                      "synchronous calls from the direct path's list.")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch.")
    torch_compile: bool = Field(
        default=False, description="On a CPU, run the model through torch.compile (inductor); eager if it fails."
    )
    cpu_backend: Literal["auto", "torch", "openvino"] = Field(
        default="auto", description="On a CPU: torch, or OpenVINO for an XLM-RoBERTa cross-encoder's encoder "
                                    "(torch where it cannot run); auto: OpenVINO for bf16 on a CPU with AMX "
                                    "where openvino is installed, torch elsewhere.",
    )
    gpus: str = Field(
        default="auto", description="Launcher: GPUs to start workers on: auto, none, or ids like 0,1."
    )
    feeders_per_device: int | None = Field(
        default=None, ge=1, validation_alias=AliasChoices("feeders_per_device", "workers_per_device"),
        description="Launcher: worker processes feeding each device's one engine (WORKERS_PER_DEVICE is read "
                    "too); unset = from the host's cores per device (rerank.launch.default_feeders).",
    )
    engine_socket: str | None = Field(
        default=None, description="Worker: feed the shared engine listening on this Unix socket (set by the "
                                  "launcher) instead of starting an engine of its own.",
    )
    engine_wait: float = Field(
        default=1800.0, gt=0, description="Worker: how long a feeder waits for its shared engine to be ready.",
    )
    heartbeat_interval: float = Field(default=2.0, gt=0)
    visibility_timeout: int = Field(
        default=900, ge=5, description="Seconds before an unacknowledged task is handed out again."
    )
    redeliver_after: float = Field(
        default=30.0, gt=0,
        description="Seconds without a heartbeat before a worker's unacknowledged tasks are handed out again.",
    )
    worker_restart_max_delay: float = Field(
        default=60.0, gt=0, description="Launcher: longest wait before restarting a worker that keeps dying."
    )

    # --- logs ---------------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = False

    _specs: tuple[ModelSpec, ...] = ()

    @model_validator(mode="after")
    def _parse_models(self) -> Settings:
        self._specs = tuple(parse_models(self.models, self.max_length))
        return self

    # --- derived values -----------------------------------------------------------------------
    @property
    def served_models(self) -> tuple[ModelSpec, ...]:
        return self._specs

    @property
    def tokens(self) -> list[str]:
        """Accepted bearer tokens; empty means the server runs open."""
        if self.access_token is None:
            return []
        return [t.strip() for t in self.access_token.get_secret_value().split(",") if t.strip()]

    @property
    def broker_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def input_prefixes(self) -> list[str]:
        """URL prefixes a job's input_url may start with (JOB_INPUT_PREFIXES); empty: none."""
        return [p.strip() for p in (self.job_input_prefixes or "").split(",") if p.strip()]

    @property
    def job_storage_url(self) -> str:
        return self.jobs_url or str((self.data_dir / "jobs").resolve())

    def model(self, name: str | None) -> ModelSpec | None:
        """The served model a request's `model` field means, or None when no served one matches.

        FastGPT users type model ids freely, so with a single served model every name reaches it.
        """
        if len(self._specs) == 1 or not name:
            return self._specs[0]
        for spec in self._specs:
            if name in spec.aliases:
                return spec
        return None

    def redacted(self) -> dict[str, object]:
        """The effective configuration, fit for a start-up log line (tokens and passwords hidden)."""
        values = self.model_dump(mode="json")
        values["access_token"] = f"<{len(self.tokens)} token(s)>" if self.tokens else None
        values["redis_sentinel_password"] = "***" if self.redis_sentinel_password else None
        if self.redis_url:
            values["redis_url"] = re.sub(r"//([^@/]*)@", "//***@", self.redis_url)
        values["models"] = [spec.model_dump() for spec in self._specs]
        return values


def parse_models(value: str, default_max_length: int | None = None) -> list[ModelSpec]:
    """Read `MODELS`: `bge-reranker-base`, `my-model=/models/x,qwen3-reranker-0.6b`, or JSON.

    A known name maps to its Hugging Face id and family; an unknown one needs a source, and its
    family is what its config.json names (a folder whose config names Qwen3ForCausalLM is a
    Qwen3-Reranker) unless the JSON form says (`[{"name": ..., "source": ..., "max_length": ...,
    "family": ..., "template": {...}}]`). max_length: the entry's, else MAX_LENGTH (never beyond
    what a known model takes), else the model's own default (docs/models.md).
    """
    value = value.strip()
    entries: list[dict[str, object]]
    if value.startswith("["):
        entries = json.loads(value)
    else:
        entries = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, _, source = part.partition("=")
            entries.append({"name": name.strip(), "source": source.strip() or None})
    if not entries:
        raise ValueError("MODELS names no model")
    specs = []
    for entry in entries:
        name = str(entry["name"])
        known = KNOWN_MODELS.get(name)
        source = entry.get("source") or (known.source if known else None)
        if not source:
            raise ValueError(f"model {name!r} is not one of {sorted(KNOWN_MODELS)}: give its source")
        family = entry.get("family") or (known.family if known and source == known.source else None)
        family = family or detect_folder(str(source))
        limit = known.limit if known else None
        if entry.get("max_length"):
            max_length = int(entry["max_length"])  # type: ignore[call-overload]
            if limit is not None and max_length > limit:
                raise ValueError(f"{name} takes at most {limit} tokens, not {max_length}")
        elif default_max_length is not None:  # the global default never exceeds what a known model can take
            max_length = min(default_max_length, limit or default_max_length)
        else:
            max_length = known.default_length if known else CONTEXT_LENGTHS.get(family or "cross-encoder", 512)
        specs.append(ModelSpec(name=name, source=str(source), max_length=max_length, family=family,
                               template=entry.get("template")))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"MODELS names a model twice: {names}")
    return specs


def choose_model(settings: Settings, name: str | None) -> ModelSpec:
    """The served model a worker or engine process is for (`--model`, needed when several are served)."""
    specs = settings.served_models
    if name is None:
        if len(specs) > 1:
            raise SystemExit(f"several models are served; pick one with --model: {[s.name for s in specs]}")
        return specs[0]
    for spec in specs:
        if name in spec.aliases:
            return spec
    raise SystemExit(f"model {name!r} is not served; MODELS gives {[s.name for s in specs]}")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
