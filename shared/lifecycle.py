"""How the service's processes end and tie their lives together: exit statuses and parent death.

The launcher (rerank/launch.py), the workers (worker/__main__.py) and the engine process
(engine/process.py) agree on these, so each is defined here once.
"""

from __future__ import annotations

import ctypes
import signal

#: A worker or engine whose model could not be loaded (the launcher retries it with back-off).
EXIT_MODEL_FAILED = 3
#: A worker whose own engine process died under it (the launcher or orchestrator restarts it).
EXIT_ENGINE_DIED = 4


def die_with_parent(sig: int = signal.SIGTERM, *, ignore_stop_signals: bool = False) -> None:
    """For `preexec_fn`: on Linux the child gets `sig` when the process that started it dies, so
    nothing is left behind when a launcher or worker is killed. With `ignore_stop_signals` the
    child also ignores SIGTERM and SIGINT (sent to a whole process group on Ctrl-C or a stop): an
    engine process serving its own worker must outlive the worker's graceful shutdown, which still
    needs it to finish the tasks in flight."""
    if ignore_stop_signals:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass
