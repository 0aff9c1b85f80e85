"""The API's gunicorn worker class: gevent's event loop, with a read timeout on client sockets.

Why an event loop: the service listens on port 6006 itself (FastGPT's deployment page puts no
proxy in front), and gunicorn's threaded worker lends a thread to every connection that is
reading its request. 80 connections that each sent one byte and stalled held all 64 threads;
every call and /health timed out. Measured on the 2-core test VM with 500 such connections open
(half stalled in the headers, half in the body): gthread answered nothing within 15 s; gevent
answered /health in 2-5 ms, calls in 11-48 ms, and 64 concurrent calls all 200 within 0.5 s. A
waiting connection costs a greenlet, and the synchronous call's BLPOP and Celery publish wait on
gevent's patched sockets, so `API_CONNECTIONS` calls per process can wait at once.

Why a subclass (gunicorn 27, workers/ggevent.py `GeventWorker.handle`): gunicorn closes a
connection whose request headers are not complete within `keepalive` seconds, but it clears the
socket timeout, so a client that sends its headers and then stalls in the body holds its
connection for ever. `CLIENT_TIMEOUT` bounds every read from and write to a client socket.
"""

from __future__ import annotations

from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from shared.settings import get_settings


class ApiWorker(GeventWorker):
    def handle(self, listener, client, addr):
        client.settimeout(get_settings().client_timeout)
        AsyncWorker.handle(self, listener, client, addr)  # GeventWorker.handle only clears the timeout
