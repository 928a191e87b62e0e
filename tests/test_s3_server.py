"""The test S3 server itself (tests/common/s3.py): it answers signed requests with its generated keys on
loopback only, refuses a wrong secret, and survives a restart with its data."""

from __future__ import annotations

import pytest
from common.s3 import S3Server

pytestmark = pytest.mark.remote
obstore = pytest.importorskip("obstore", reason="obstore is not installed (the remote extra)")


def _store(server: S3Server, secret: str | None = None):
    from obstore.store import S3Store

    return S3Store(server.bucket, endpoint=server.endpoint, access_key_id=server.key,
                   secret_access_key=secret or server.secret, region="us-east-1", client_options={"allow_http": True})


def test_server_put_get_restart_and_wrong_secret(tmp_path):
    with S3Server.start(tmp_path) as server:
        assert server.endpoint.startswith("http://127.0.0.1:")
        store = _store(server)
        obstore.put(store, "k/one", b"x" * 1000)
        assert bytes(obstore.get(store, "k/one", options={"range": (10, 20)}).bytes()) == b"x" * 10
        with pytest.raises(Exception, match="(?i)403|forbidden|signature|denied|unauthenticated"):
            obstore.get(_store(server, "wrong-secret"), "k/one").bytes()
        server.restart()
        assert obstore.head(store, "k/one")["size"] == 1000
    assert server.proc is None
