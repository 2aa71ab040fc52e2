"""Environment helpers: a patched ``os.environ``, the test AWS credentials, a free port, a local S3 endpoint, a local
read-only HTTP file server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def patched_environ(env: dict[str, str]) -> Iterator[None]:
    """Make os.environ equal to ``env`` for the body, then undo only the keys that changed (so variables other
    fixtures set meanwhile survive)."""
    changed = {k for k in os.environ if k not in env} | {k for k, v in env.items() if os.environ.get(k) != v}
    saved = {k: os.environ.get(k) for k in changed}
    for key in changed:
        if key in env:
            os.environ[key] = env[key]
        else:
            del os.environ[key]
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(cmd: list[str], port: int, name: str) -> Iterator[None]:
    """Run ``cmd`` until the body ends, once it accepts connections on ``port``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{name} did not start on port {port}") from None
            time.sleep(0.05)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A real S3 API served by ``moto_server`` on a free local port; the AWS environment points at it meanwhile."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    endpoint = f"http://127.0.0.1:{port}"
    with (
        _server([str(exe), "-H", "127.0.0.1", "-p", str(port)], port, "moto_server"),
        patched_environ({**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": endpoint}),
    ):
        yield endpoint


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """``directory`` served read-only over HTTP (Python's ``http.server``) on a free local port; yields the base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)]
    with _server(cmd, port, "http.server"):
        yield f"http://127.0.0.1:{port}"
