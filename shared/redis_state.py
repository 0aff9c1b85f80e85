"""What state Redis is in, told from an error it raised or from a probe: the one place that knows.

Redis refuses work in more ways than "gone": with a full disk it answers every write with
`MISCONF` (and recovers by itself once its append-only file can be written again), at
`maxmemory` it answers writes with `OOM`, a replica answers `READONLY`. PING still works in all
of them, so readiness needs a write. The API reports each state by its name (a 503 whose message
says what is wrong, `/ready` with `"redis": "<state>"`), never all of them as "unreachable".
The errors may come from redis-py directly, from inside a Lua script (the message then carries
the error after the script's name), or wrapped by kombu (OperationalError), so the text is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import redis
from kombu.exceptions import OperationalError
from redis.sentinel import MasterNotFoundError

from shared import names

OK, UNREACHABLE, CANNOT_WRITE, OUT_OF_MEMORY, READ_ONLY, REFUSED, FAILING_OVER = (
    "ok", "unreachable", "cannot_write", "out_of_memory", "read_only", "refused", "failing_over")

#: Redis error codes (the first word of an error reply) and the state each means.
_CODES = {"MISCONF": CANNOT_WRITE, "OOM": OUT_OF_MEMORY, "READONLY": READ_ONLY,
          "NOAUTH": REFUSED, "WRONGPASS": REFUSED, "NOPERM": REFUSED}
_CODE_IN_TEXT = re.compile(r"(?:^|[\s:-])(" + "|".join(_CODES) + r")\b")


@dataclass(frozen=True)
class RedisState:
    state: str  # ok, unreachable, cannot_write, out_of_memory, read_only, refused, failing_over
    reason: str  # what a person reads in the 503 and in /ready

    @property
    def ok(self) -> bool:
        return self.state == OK


HEALTHY = RedisState(OK, "Redis answers and accepts writes")


def classify(exc: BaseException) -> RedisState:
    """The state a Redis (or kombu) error shows; anything unrecognised counts as unreachable."""
    errors = list(_chain(exc))
    text = " ".join(str(e) for e in errors)
    # redis-py strips the code of the errors it has a class for (OOM, READONLY, NOAUTH …) and keeps
    # it in `status_code`; others (MISCONF, any error inside a Lua script) keep it in the text.
    code = next((e.status_code for e in errors if getattr(e, "status_code", None) in _CODES), None)
    match = _CODE_IN_TEXT.search(text) if code is None else None
    code = code or (match.group(1) if match else None)
    if code is None:
        if any(isinstance(e, MasterNotFoundError) for e in errors):
            return RedisState(FAILING_OVER, "no Redis primary right now (Sentinel is promoting a replica); "
                                            "retry in a few seconds")
        if any(isinstance(e, redis.AuthenticationError) for e in errors):
            code = "NOAUTH"
        else:
            return RedisState(UNREACHABLE, "the queue (Redis) is unreachable")
    state = _CODES[code]
    if state == CANNOT_WRITE:
        detail = text[text.find(code) + len(code):].strip(" .") if code in text else ""
        # "Errors writing to the AOF file: No space left on device" -> the cause only
        cause = detail.rsplit(":", 1)[-1].strip()[:200] if ":" in detail else "see the Redis log"
        return RedisState(state, f"Redis cannot write to its disk ({cause}); writes are refused until it can")
    if state == OUT_OF_MEMORY:
        return RedisState(state, "Redis is out of memory (maxmemory reached); writes are refused")
    if state == READ_ONLY:
        return RedisState(state, "Redis is a read-only replica; REDIS_URL must name the primary")
    return RedisState(REFUSED, "Redis refused our credentials (check the password in REDIS_URL)")


def probe(client: redis.Redis) -> RedisState:
    """Whether Redis takes a (tiny, expiring) write now: PING alone passes while writes are refused."""
    try:
        client.set(names.probe_key(), "1", px=10_000)
    except redis.RedisError as exc:
        return classify(exc)
    return HEALTHY


def is_redis_error(exc: BaseException) -> bool:
    return isinstance(exc, (redis.RedisError, OperationalError))


def _chain(exc: BaseException | None):
    seen = 0
    while exc is not None and seen < 5:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
