"""Where a cache lives: a local folder, or an object store named by URL (``s3://bucket/prefix.zarr``,
``gs://``, ``az://``), as the zarr store that reads and writes it. The one module that turns a location
into a store; the zarr format asks it (:func:`cache.formats.zarr.store.store_for`).

Object stores go through ``obstore`` (zarr's ``ObjectStore``): one Rust client per store with its own
connection pool, an async range API the remote row reader uses (:mod:`cache.formats.zarr.remote`),
2.7-4x the throughput of s3fs for whole objects on the test server (docs/remote.md). Other URLs
(``memory://``, ``http://``, ...) go through fsspec, zarr's default.

Settings. Endpoint, region and credentials come from the standard environment, as every S3 tool reads it
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``, ``AWS_ALLOW_HTTP`` for a plain-http endpoint, ``AWS_SKIP_SIGNATURE`` for anonymous access;
``GOOGLE_*`` and ``AZURE_*`` likewise), or from ``options`` passed to :func:`open_store` (obstore's
config keys: ``endpoint``, ``region``, ``access_key_id``, ``skip_signature``, ...; ``allow_http`` and the
other client options too). They are never written anywhere: not into the manifest, not into a resolved
config, not into a log line (a test greps every file a build and a training run write for the secret).

Errors. A missing client package is a :class:`StoreError` with remedy ``client``; an unreachable
endpoint, refused credentials or a missing bucket one with remedy ``store``: what they are, never a
damaged cache.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from .errors import CacheError, Remedy
from .files import local_root

__all__ = ["OBJECT_SCHEMES", "StoreError", "is_store", "location", "object_store", "open_store", "scheme_of",
           "store_error", "check_reachable"]

#: URL schemes read through obstore (its S3, GCS and Azure clients).
OBJECT_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "adl")
_CLIENT_OPTIONS = ("allow_http", "allow_invalid_certificates", "connect_timeout", "timeout", "pool_idle_timeout",
                   "user_agent", "proxy_url", "http2_only")
# Retries inside the client (transient errors on every path): at most 3, within 20 s, backoff 0.1 s .. 2 s.
_RETRY = {"max_retries": 3, "retry_timeout": timedelta(seconds=20),
          "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2}}


class StoreError(CacheError):
    """The store of a cache cannot be used: its client package is missing (remedy ``client``), or its
    endpoint does not answer, refuses the credentials, or has no such bucket (remedy ``store``). ``url``:
    the cache; ``reason``: the client's own words (one line, no credentials)."""

    remedy: Remedy | None = "store"

    def __init__(self, message: str, *, url: str | None = None, remedy: Remedy | None = None,
                 reason: str = "") -> None:
        super().__init__(message, url=url, remedy=remedy)
        self.reason = reason


def scheme_of(url: str | os.PathLike) -> str | None:
    """The URL scheme (``s3``, ``memory``, ...), None for a local path or ``file://``."""
    if local_root(url) is not None:
        return None
    return os.fspath(url).split("://", 1)[0].lower()


def is_store(obj: Any) -> bool:
    """Whether ``obj`` is a store object (a zarr store, or an obstore store) rather than a path or URL."""
    return not isinstance(obj, (str, bytes, os.PathLike))


def location(obj: Any) -> str:
    """A printable location for a path, URL or store object (for messages and ``CacheReader.url``)."""
    if not is_store(obj):
        return os.fspath(obj)
    inner = getattr(obj, "store", obj)  # zarr's ObjectStore holds the obstore store
    for attr in ("url", "path", "root"):
        value = getattr(inner, attr, None) or getattr(obj, attr, None)
        if isinstance(value, (str, os.PathLike)) and os.fspath(value):
            return os.fspath(value)
    config = getattr(inner, "config", None)
    prefix = getattr(inner, "prefix", None)
    if isinstance(config, Mapping) and config.get("bucket"):
        return f"s3://{config['bucket']}/{prefix or ''}".rstrip("/")
    return repr(obj)


def _import_obstore(url: str) -> Any:
    try:
        import obstore.store
    except ImportError:
        raise StoreError(f"{url}: reading or writing a cache in an object store needs the obstore package, which "
                         "is not installed", url=url, remedy="client", reason="no module named 'obstore'") from None
    return obstore.store


_STORES: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
_LOCK = threading.Lock()


def _settle(timeout: float = 20.0) -> None:
    """At exit, before zarr closes its event loop (its own atexit hook, registered earlier, so run later): wait,
    at most ``timeout`` seconds, for the requests still in flight on that loop. The store client completes each
    request by calling into the loop from its own thread; one that completes into a closed loop while the
    interpreter shuts down aborts the process (a failed request leaves its siblings running: zarr opens a group
    by reading four keys at once, and an endpoint that does not answer fails them one by one)."""
    try:
        from zarr.core import sync as zsync

        loop = zsync.loop[0]
    except Exception:  # another zarr: nothing known to wait for
        return
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def pending() -> int:
        return sum(1 for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done())

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not asyncio.run_coroutine_threadsafe(pending(), loop).result(timeout=1):
                return
        except Exception:  # the loop stopped meanwhile
            return
        time.sleep(0.02)


_SETTLE_REGISTERED = False


def object_store(url: str, options: Mapping[str, Any] | None = None) -> Any:
    """The obstore store of ``url`` (an ``OBJECT_SCHEMES`` URL; the path is its prefix), settings from the
    environment and ``options``; one per (url, options) in a process, so that its connections are reused."""
    url = url.rstrip("/")
    options = dict(options or {})
    key = (url, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _LOCK:
        if key in _STORES:
            return _STORES[key]
    stores = _import_obstore(url)
    global _SETTLE_REGISTERED
    with _LOCK:
        if not _SETTLE_REGISTERED:  # after zarr's import, so that it runs before zarr's own exit hook
            import zarr.core.sync  # noqa: F401

            atexit.register(_settle)
            _SETTLE_REGISTERED = True
    client = {k: options.pop(k) for k in list(options) if k in _CLIENT_OPTIONS}
    if "allow_http" not in client and os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes"):
        client["allow_http"] = True
    try:
        store = stores.from_url(url, client_options=client or None, retry_config=_RETRY, **options)
    except Exception as e:  # an unknown option, a malformed URL
        raise StoreError(f"{url}: the store cannot be set up: {_one_line(e)}", url=url, reason=_one_line(e)) from None
    with _LOCK:
        return _STORES.setdefault(key, store)


def open_store(url: str | os.PathLike | Any, *, options: Mapping[str, Any] | None = None,
               read_only: bool = False) -> Any:
    """The zarr store at ``url``: a local folder (``zarr.storage.LocalStore``, which need not exist yet),
    an object store URL (``zarr.storage.ObjectStore`` over obstore), any other URL through fsspec, or a
    store object as given (a zarr store; an obstore store is wrapped)."""
    import zarr

    if is_store(url):
        if options:
            raise CacheError("storage options go with a URL, not with a store object (configure the store itself)")
        if isinstance(url, zarr.abc.store.Store):
            return url
        return zarr.storage.ObjectStore(url, read_only=read_only)
    url = os.fspath(url)
    root = local_root(url)
    if root is not None:
        if options:
            raise CacheError(f"{url} is a local path: storage options apply to store URLs (s3://, gs://, az://)",
                             url=url)
        return zarr.storage.LocalStore(root, read_only=read_only)
    if scheme_of(url) in OBJECT_SCHEMES:
        return zarr.storage.ObjectStore(object_store(url, options), read_only=read_only)
    try:
        return zarr.storage.FsspecStore.from_url(url, storage_options=dict(options or {}) or None,
                                                 read_only=read_only)
    except ImportError as e:
        raise StoreError(f"{url}: the client package of this store is not installed: {e}", url=url,
                         remedy="client", reason=str(e)) from None


def _one_line(e: BaseException) -> str:
    text = str(e).split("\n\nDebug source", 1)[0]
    text = re.sub(r"<\?xml.*", "", text, flags=re.S).strip()
    return " ".join(text.split())[:400] or type(e).__name__


#: An HTTP 403 status in a client's message (not the digits of a duration such as "in 403.895638ms").
_HTTP_403 = re.compile(r"(?<![\d.])403(?![\d.]|\s*ms)")


def store_error(url: str, e: BaseException, *, doing: str = "reading") -> StoreError | None:
    """The :class:`StoreError` an exception of the store's client means (unreachable endpoint, refused
    credentials, missing bucket, plain http not allowed), or None when it is not one of those."""
    if isinstance(e, StoreError):
        return e
    module = type(e).__module__ or ""
    text = str(e)
    if not (module.startswith(("obstore", "aiohttp", "botocore", "s3fs")) or isinstance(e, (ConnectionError,
                                                                                            TimeoutError))):
        return None
    line = _one_line(e)
    if "builder error" in text:
        why = ("the endpoint is plain http, which the client refuses unless AWS_ALLOW_HTTP=true (--store-allow-http, "
               "allow_http)")
    elif "NoSuchBucket" in text:
        why = "the bucket does not exist"
    elif any(s in text for s in ("error sending request", "Connection refused", "dns error", "timed out")):
        why = "the endpoint does not answer"  # before the status codes: "in 403.9ms" is a duration, no status
    elif _HTTP_403.search(text) or any(s in text for s in (
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Unauthenticated", "PermissionDenied")
    ) or type(e).__name__ in ("UnauthenticatedError", "PermissionDeniedError"):
        why = "the store refused the credentials"
    elif "Connect" in text or "connect" in text:
        why = "the endpoint does not answer"
    else:
        return None
    return StoreError(f"{url}: {doing} the store failed: {why} ({line})", url=url, reason=line)


def check_reachable(url: str, store: Any) -> None:
    """List one key under the cache's prefix: a :class:`StoreError` when the endpoint, the credentials or
    the bucket are wrong (so that 'no cache here' is only said of a store that answered)."""
    from zarr.core.sync import sync

    async def first() -> None:
        async for _ in store.list_prefix(""):
            break

    try:
        sync(first())
    except Exception as e:
        err = store_error(url, e)
        if err is not None:
            raise err from None
        raise
