"""Every call into distributed that its public API does not promise, or that changed between the
versions unidask supports (``pyproject.toml``'s lower bound to the newest), in one place.

``tests/test_daskapi.py`` checks each against the installed distributed, so a release that
renames or reshapes one fails there, by name, rather than somewhere in a run.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Callable

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, as_completed
from distributed.http.utils import RequestHandler  # a route of Dask's own HTTP server

from . import files

log = logging.getLogger(__name__)

__all__ = ["RequestHandler", "address_host", "workers", "start_workers", "bound_tls_handshakes", "withstand_floods",
           "mend_sitemap",
           "dashboard_page", "page_template", "running_tasks"]


def _all_workers_kwargs() -> dict[str, Any]:
    # distributed 2025.5 to 2026.3: scheduler_info() answers for at most 5 workers unless
    # n_workers=-1 is passed; earlier releases take no such argument and answer for all
    return {"n_workers": -1} if "n_workers" in inspect.signature(Client.scheduler_info).parameters else {}


_ALL_WORKERS = _all_workers_kwargs()


def workers(client: Client) -> dict[str, dict[str, Any]]:
    """Every worker the scheduler knows: {address: its identity (name, last_seen, nthreads...)}."""
    return client.scheduler_info(**_ALL_WORKERS)["workers"]


def start_workers(cluster) -> None:
    """Start the workers of a ``SpecCluster``'s ``worker_spec`` that are not running, and wait for
    them; raises where one fails to start. ``cluster.scale(n)``, the public way, starts them in a
    callback nobody awaits: a failed start there is a traceback in the log, not an error here."""
    cluster.sync(cluster._correct_state)


def bound_tls_handshakes(timeout: float) -> None:
    """Close an incoming connection whose TLS handshake has not finished in ``timeout`` seconds.
    distributed waits for it without end, so every half-open connection (a local user's flood
    of them, a port scanner) holds a file descriptor of the scheduler's or worker's process for
    good, until the process hits its open-file limit and fails. Applies to the listeners of this
    process; idempotent."""
    from distributed.comm.tcp import TLSListener

    original = TLSListener._prepare_stream
    if getattr(original, "unidask_timeout", None) is not None:
        original.unidask_timeout = timeout
        return

    async def prepare_stream(self, stream, address):
        try:
            return await asyncio.wait_for(original(self, stream, address), prepare_stream.unidask_timeout)
        except asyncio.TimeoutError:
            _said_closed(self.contact_address, prepare_stream.unidask_timeout)   # said before the peer sees EOF
            stream.close()
            return None

    prepare_stream.unidask_timeout = timeout
    TLSListener._prepare_stream = prepare_stream


_closed: dict[str, list[float]] = {}   # listener -> [connections closed since last said, when said]


def _said_closed(listener: str, timeout: float, every: float = 60.0) -> None:
    # one line for the first such connection, then one a minute at most: a flood is thousands
    count, said = _closed.setdefault(listener, [0, -every])
    now = time.monotonic()
    if now - said < every:
        _closed[listener][0] = count + 1
        return
    _closed[listener] = [0, now]
    log.warning("%s: closed %d connection(s) that sent no TLS handshake within %g s (a port scan, or another "
                "local user's flood of half-open connections); the run goes on",
                listener, count + 1, timeout)


def withstand_floods() -> None:
    """For a process that runs a scheduler, nannies or workers: the soft open-file limit raised
    to the hard one, and a TLS handshake not finished in Dask's connect timeout closed. Another
    local user's flood of half-open connections (no handshake) then costs a descriptor each for
    that long, not for good: with the limit of 1,024 a flood crashed the run in seconds."""
    before, after = files.raise_open_files()
    if after > before:
        log.debug("open-file limit raised from %d to %d", before, after)
    bound_tls_handshakes(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect")))


def mend_sitemap() -> None:
    """Dask's ``/sitemap.json`` answers 500 (a ``KeyError``) on every dashboard: it walks the
    directory of each static-file route from the route's ``path`` argument, and bokeh's static
    route takes its directory from the application's settings instead. Such a route is listed by
    its prefix. Applies to dashboards of this process; idempotent."""
    import tornado.routing
    from distributed.http import routing
    from tornado.web import StaticFileHandler

    original = routing._descend_routes
    if getattr(original, "unidask", False):
        return

    def descend(router, routers=None, out=None):
        routers = set() if routers is None else routers
        out = set() if out is None else out
        pathless = [rule for rule in list(router.named_rules.values()) + router.rules
                    if isinstance(rule.matcher, tornado.routing.PathMatches)
                    and isinstance(rule.target, type) and issubclass(rule.target, StaticFileHandler)
                    and "path" not in rule.target_kwargs]
        if not pathless:
            return original(router, routers, out)
        # Dask's walk over the other rules: a copy of the router without the pathless ones
        rest = tornado.routing.RuleRouter()
        rest.rules = [rule for rule in router.rules if rule not in pathless]
        rest.named_rules = {k: rule for k, rule in router.named_rules.items() if rule not in pathless}
        routers.add(router)
        out.update(rule.matcher.regex.pattern.rstrip("(.*)$").rstrip("/") + "/" for rule in pathless)
        return original(rest, routers, out)

    descend.unidask = True
    routing._descend_routes = descend


def address_host(address: str) -> str:
    """The host of a Dask address (``tls://10.0.0.2:8786`` -> ``10.0.0.2``, IPv6 too)."""
    from distributed.comm import get_address_host

    return get_address_host(address)


def dashboard_page(path: str, page: Callable) -> None:
    """Serve the bokeh document ``page(scheduler, extra, doc)`` at ``path`` of the dashboard of
    schedulers created after this call in this process (distributed has no public way)."""
    from distributed.dashboard.scheduler import applications

    applications[path] = page


def page_template():
    """Dask's own dashboard page template (its menu and style), for a page of ours."""
    from distributed.dashboard.components.scheduler import env

    return env.get_template("simple.html")


def running_tasks(scheduler) -> int:
    """Tasks running on the workers, seen from inside the scheduler's process."""
    return sum(len(ws.processing) for ws in scheduler.workers.values())


def next_completed(completed: as_completed, timeout: float) -> list:
    """The futures of ``completed`` that finished (with their results), as soon as one has, at
    most ``timeout`` seconds ([] if none did). Woken by the completion itself (the condition
    as_completed notifies, its ``thread_condition``), not by polling; its own iterator wakes every
    100 ms and has no timeout of its own."""
    condition = completed.thread_condition
    with condition:
        condition.wait_for(completed.has_ready, timeout)
    return completed.next_batch(block=False)
