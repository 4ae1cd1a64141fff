"""Serve an ASGI app with uvicorn from a thread of this process (a notebook, a test, the CLI)."""

from __future__ import annotations

import asyncio
import threading
import time


class ThreadedServer:
    """uvicorn on a loopback port in a daemon thread.

    Args:
        app: the ASGI app.
        port (`int`): the loopback port.
        name (`str`): the thread's name, for stack dumps.
    """

    def __init__(self, app, port: int, name: str) -> None:
        self.app = app
        self.port = port
        self.name = name
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ThreadedServer:
        import uvicorn

        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start on {self.url}")
            time.sleep(0.02)
        return self

    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (to run coroutines on it from another thread)."""
        for server in self._server.servers if self._server else []:
            return server.get_loop()
        raise RuntimeError(f"{self.name} is not running")

    def stop(self, timeout: float = 30) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
        self._server = self._thread = None
