"""Serving the app over HTTP with uvicorn: `serve` for the command line (engine on the calling thread),
`BackgroundServer` for tests, benchmarks and notebooks, `wait_until_serving` for their clients."""

from __future__ import annotations

import time

from fastapi import FastAPI

from .app import create_app
from .guard import GuardedH11Protocol, Limits
from .hub import Hub


class BackgroundServer:
    """The app served by uvicorn in a thread on 127.0.0.1 and a free port, for tests, benchmarks and
    notebooks: `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # see GuardedH11Protocol
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, app.state.hub.limits, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def uvicorn_config(app: FastAPI, limits: Limits, **kwargs):
    """uvicorn's settings for our app: its h11 protocol with our header deadline and JSON errors (see
    guard.GuardedH11Protocol), idle keep-alive connections closed after 5 s."""
    import uvicorn

    protocol = type("Protocol", (GuardedH11Protocol,), {"header_timeout": limits.read_timeout})
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=5, **kwargs)


def wait_until_serving(url: str, proc, timeout: float = 120) -> None:
    """Poll GET /health of a `llamalite serve` started as subprocess `proc` until it answers (tests,
    benchmarks); raise if the process exits first or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} did not start (its process "
                               f"{'exited' if proc.poll() is not None else 'is still starting'})")
        time.sleep(0.1)


def serve(hub: Hub, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the hub's models until Ctrl-C or SIGTERM: the engines on this thread (the one that loaded
    the first model), HTTP in another. Requests still running when it stops end with an error event
    (503), not a hang. The Host names served are localhost, IP literals, the bind address and, bound to
    every interface, this machine's name, besides `hub.limits.allowed_hosts`."""
    import dataclasses
    import signal
    import socket
    import threading

    import uvicorn

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a service manager's stop: the same clean shutdown as Ctrl-C

    names = [host.lower()] + ([socket.gethostname().lower(), socket.getfqdn().lower()] if host in ("0.0.0.0", "::") else [])
    hub.limits = dataclasses.replace(hub.limits, allowed_hosts=(*hub.limits.allowed_hosts, *names))
    http = uvicorn.Server(uvicorn_config(create_app(hub, start_engine=False), hub.limits, host=host, port=port,
                                         log_level="info"))
    thread = threading.Thread(target=http.run, name="llamalite-http", daemon=True)
    thread.start()
    watcher = threading.Thread(target=lambda: (thread.join(), hub.stop()), daemon=True)
    watcher.start()  # the HTTP side ending (port taken, shutdown) ends the engine loop too
    try:
        hub.runner.run()
    except KeyboardInterrupt:
        pass
    finally:
        failed = not http.should_exit and not thread.is_alive()
        http.should_exit = True
        hub.stop()
        thread.join(timeout=10)
    if failed:
        raise OSError(f"could not serve on {host}:{port} (the reason is logged above); is the port in use? "
                      f"Try another with --port")
