"""A local S3-compatible server for tests: moto in server mode on 127.0.0.1, an ephemeral
port, fake credentials, started and stopped around the tests that use it. Nothing leaves
the machine. Tests are skipped, with the reason, when moto or s3fs is not installed (both
come with the ``test`` extra)."""
from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

import pytest

BUCKET = "transferlab-test"


def isolated_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Credentials and endpoint for ``endpoint`` only: no profile or config file of the
    machine can send a request elsewhere."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    clear_clients()


def clear_clients() -> None:
    """fsspec caches filesystems (and their endpoint) per process: start afresh."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Run the server; yields its endpoint URL with the environment pointing at it and the
    bucket ``BUCKET`` created."""
    pytest.importorskip("s3fs", reason="needs s3fs (pip install -e '.[test]')")
    server_mod = pytest.importorskip("moto.server",
                                     reason="needs moto[server] (pip install -e '.[test]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        with pytest.MonkeyPatch.context() as patch:
            isolated_env(patch, endpoint)
            import s3fs

            s3fs.S3FileSystem().mkdir(BUCKET)
            yield endpoint
            clear_clients()
    finally:
        server.stop()
