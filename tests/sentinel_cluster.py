"""A real Redis Sentinel set-up for the failover tests: a master, a replica and three Sentinels.

Every process is a `redis-server` (the same binary the launcher uses; `--sentinel` makes it a
Sentinel) on a free loopback port, with Sentinel's timeouts cut to about a second so a failover
takes seconds, not the 30 s of the defaults. `stop()` ends every process it started.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import redis

from rerank.launch import free_port, redis_server_binary
from tests.procs import Proc, base_env, wait_for

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 2000


class SentinelCluster:
    def __init__(self, log_dir: Path, work: Path) -> None:
        self.log_dir = log_dir
        self.work = work
        self.nodes: dict[int, Proc] = {}  # data nodes by port
        self.sentinels: dict[int, Proc] = {}

    # --- starting ---------------------------------------------------------------------------------
    def start(self) -> SentinelCluster:
        master = free_port()
        self.start_node(master)
        self.start_node(free_port(), replica_of=master)
        self.wait_replicas(master, 1)
        for _ in range(3):
            self._start_sentinel(master)
        wait_for(lambda: all(self._sentinel_sees(p, replicas=1, sentinels=2) for p in self.sentinels), 20,
                 "the Sentinels to see the master, its replica and each other")
        return self

    def start_node(self, port: int, replica_of: int | None = None) -> Proc:
        argv = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "no", "--dir", str(self.work)]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        proc = Proc(f"redis-node-{port}", argv, base_env(), self.log_dir)
        wait_for(redis.Redis(port=port).ping, 15, f"redis node {port}", proc)
        self.nodes[port] = proc
        return proc

    def _start_sentinel(self, master: int) -> None:
        port = free_port()
        conf = self.work / f"sentinel-{port}.conf"  # Sentinel rewrites its file: one each
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\ndir {self.work}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        proc = Proc(f"sentinel-{port}", [redis_server_binary(), str(conf), "--sentinel"], base_env(), self.log_dir)
        wait_for(redis.Redis(port=port).ping, 15, f"sentinel {port}", proc)
        self.sentinels[port] = proc

    def _sentinel_sees(self, port: int, *, replicas: int, sentinels: int) -> bool:
        info = redis.Redis(port=port, decode_responses=True).sentinel_master(MASTER_NAME)
        return int(info["num-slaves"]) >= replicas and int(info["num-other-sentinels"]) >= sentinels

    # --- reading ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """REDIS_URL for the service: Celery's form, every Sentinel named."""
        return ";".join(f"sentinel://127.0.0.1:{p}/0" for p in self.sentinels)

    def master_port(self) -> int:
        for port in self.sentinels:
            try:
                _, master = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(master)
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no Sentinel answers")

    def master(self) -> redis.Redis:
        return redis.Redis(port=self.master_port(), socket_timeout=2)

    def wait_replicas(self, master: int, count: int, timeout: float = 30) -> None:
        """Until `count` replicas are attached to `master` and in sync (WAIT needs them online)."""
        def synced():
            info = redis.Redis(port=master).info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                      and v.get("state") == "online"]
            return len(online) >= count
        wait_for(synced, timeout, f"{count} replica(s) of {master} in sync")

    # --- breaking ---------------------------------------------------------------------------------
    def kill_master(self) -> tuple[int, float]:
        """SIGKILL the master (no goodbye to anyone); returns its port and when it died."""
        port = self.master_port()
        proc = self.nodes.pop(port)
        proc.signal(signal.SIGKILL)
        proc.stop()
        return port, time.monotonic()

    def wait_promotion(self, old: int, timeout: float = 30) -> tuple[int, float]:
        """Until every Sentinel names a new master; returns it and when that was first seen."""
        def promoted():
            ports = {self._master_of(p) for p in self.sentinels}
            return ports.pop() if len(ports) == 1 and old not in ports and None not in ports else None
        new = wait_for(promoted, timeout, "Sentinel to promote the replica")
        return new, time.monotonic()

    def _master_of(self, sentinel: int) -> int | None:
        try:
            addr = redis.Redis(port=sentinel, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER_NAME)
            return int(addr[1]) if addr else None
        except redis.RedisError:
            return None

    def rejoin(self, port: int) -> None:
        """Start a killed node again as a replica of the current master (what a restarted pod does)."""
        master = self.master_port()
        self.start_node(port, replica_of=master)
        self.wait_replicas(master, 1)

    def stop(self) -> None:
        for proc in [*self.sentinels.values(), *self.nodes.values()]:
            proc.stop()
        self.sentinels.clear()
        self.nodes.clear()
