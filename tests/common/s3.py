"""The real S3 server as pytest fixtures: :class:`tools.bench.s3server.S3Server` (SeaweedFS ``weed mini`` on
127.0.0.1, started by the tests), whose launcher lives in tools/ so that ``make bench-remote`` starts the same
server. A test that needs it skips, saying why, where the ``weed`` binary is not installed.

    server = S3Server.start(tmp_path)      # S3 answers when this returns
    server.env                             # AWS_ENDPOINT_URL, keys, region, AWS_ALLOW_HTTP
    server.url("c.zarr")                   # s3://<bucket>/c.zarr
    server.stop()
"""

from __future__ import annotations

import pytest

from tools.bench import s3server
from tools.bench.s3server import ServerUnavailable, free_ports, server_store, upload, weed_binary

__all__ = ["S3Server", "free_ports", "s3_env", "s3_server", "server_store", "upload", "weed_binary"]


class S3Server(s3server.S3Server):
    """The tools' server, skipping the test (with the reason) where it cannot start."""

    def _launch(self, timeout: float) -> None:
        try:
            super()._launch(timeout)
        except ServerUnavailable as e:
            pytest.skip(str(e))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3 server for the session (tests use keys of their own); stopped at the end, also on failure."""
    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's settings in this test's environment (the way a user gives them)."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server
