"""Every Redis client of the service is built here: plain Redis, or a master found through Sentinel.

One place, so the API, the workers, the launcher, the health check and Celery's broker can never
disagree on where Redis is. `REDIS_URL` takes Celery's own Sentinel form as well as a plain URL:

    redis://[:password@]host:port/db
    sentinel://[:password@]host:port[;sentinel://[:password@]host:port …][/db]

(`;` or `,` between the Sentinels; the password, when given, is the master's). The master's name
is `REDIS_MASTER_NAME`; Sentinels that need a password of their own get `REDIS_SENTINEL_PASSWORD`.

With Sentinel, redis-py asks the Sentinels for the master before every new connection, and a
connection to a master that was demoted is dropped when it answers READONLY, so the clients follow
a promotion by themselves; the commands' usual retries (redis-py's default: ten, with a jittered
back-off capped at 1 s) carry most calls over the seconds a promotion takes. Lua scripts are sent
by hash and loaded again on a new master that does not know them (redis-py's Script does both).
Replication is asynchronous: what must survive a promotion (an accepted job) is confirmed with
`WAIT` (`acknowledged_by_replicas`), see docs/redis-failover.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from shared.settings import Settings

SENTINEL_SCHEMES = ("sentinel", "sentinels")
DEFAULT_SENTINEL_PORT = 26379
#: A Sentinel that does not answer is skipped for the next one at once: redis-py's default retries
#: (ten, backing off to 1 s) would spend about four seconds on each Sentinel that is down.
_ASK_ONCE = Retry(NoBackoff(), 0)


@dataclass(frozen=True)
class SentinelTarget:
    """What a sentinel:// URL says: where the Sentinels are, and how to talk to the master."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def is_sentinel(url: str) -> bool:
    return url.split(":", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Read `sentinel://[:pw@]h1:26379;sentinel://h2:26379/0` (or `sentinel://h1:26379,h2:26379/0`)."""
    scheme = url.split(":", 1)[0].lower()
    parts = [p for chunk in url.split(";") for p in chunk.split(",") if p.strip()]
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for part in parts:
        part = part.strip()
        if "://" not in part:
            part = f"{scheme}://{part}"
        split = urlsplit(part)
        if split.scheme.lower() not in SENTINEL_SCHEMES:
            raise ValueError(f"REDIS_URL: {split.scheme}:// cannot follow sentinel:// (one Sentinel set per URL)")
        if not split.hostname:
            raise ValueError(f"REDIS_URL: a Sentinel without a host in {url!r}")
        sentinels.append((split.hostname, split.port or DEFAULT_SENTINEL_PORT))
        if split.password is not None and password is None:
            password = unquote(split.password)
            username = unquote(split.username) if split.username else None
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"REDIS_URL: the path of a sentinel:// URL is the database number, not {path!r}")
            db = int(path)
    if not sentinels:
        raise ValueError("REDIS_URL names no Sentinel")
    return SentinelTarget(tuple(sentinels), db, username, password, ssl=scheme == "sentinels")


def connect(settings: Settings, url: str | None = None, **options) -> redis.Redis:
    """A client of the master that `url` (default: the settings' REDIS_URL) names.

    `options` are redis-py connection options (socket timeouts, health_check_interval …); they
    apply to the master's connections, and the socket timeouts to the Sentinels' too.
    """
    url = url or settings.broker_url
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel_kwargs["retry"] = _ASK_ONCE
    if settings.redis_sentinel_password is not None:
        sentinel_kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    if target.ssl:
        options.setdefault("ssl", True)
    return sentinel.master_for(settings.redis_master_name, redis_class=redis.Redis, db=target.db,
                               username=target.username, password=target.password, **options)


def broker(settings: Settings) -> tuple[str, dict[str, object]]:
    """Celery's broker URL and the transport options it needs on top of ours (kombu's Sentinel
    transport wants every Sentinel as a full `sentinel://` URL and the master's name)."""
    url = settings.broker_url
    if not is_sentinel(url):
        return url, {}
    target = parse_sentinel_url(url)
    auth = ""
    if target.password is not None:
        auth = f"{target.username or ''}:{target.password}@"
    scheme = "sentinels" if target.ssl else "sentinel"
    urls = [f"{scheme}://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels]
    options: dict[str, object] = {"master_name": settings.redis_master_name}
    sentinel_kwargs: dict[str, object] = {"socket_connect_timeout": 2, "socket_timeout": 2, "retry": _ASK_ONCE}
    if settings.redis_sentinel_password is not None:
        sentinel_kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    options["sentinel_kwargs"] = sentinel_kwargs
    return ";".join(urls), options


def replicas_to_wait_for(settings: Settings) -> int:
    """Replicas that must hold an accepted job before its 202 (REDIS_MIN_REPLICAS; by default one
    behind Sentinel, none for a single Redis, which has no replica to wait for)."""
    if settings.redis_min_replicas is not None:
        return settings.redis_min_replicas
    return 1 if is_sentinel(settings.broker_url) else 0


def master_address(client: redis.Redis) -> tuple[str, int] | None:
    """The master the client's connections last went to (Sentinel only; no round trip), so a
    caller can tell that a promotion happened while it waited: what it wrote before may be gone."""
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        return pool.proxy.master_address
    return None
