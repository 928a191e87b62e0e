"""The advice the entry points give for the errors of ``cache``: the library raises facts with a kind of
remedy (:data:`cache.errors.REMEDIES`); this turns the remedy into the commands a user types."""

from __future__ import annotations

import errno
import os

from ..errors import CacheError, CacheMismatchError

__all__ = ["explain", "explain_os_error", "problem_advice"]


def explain(error: BaseException, *, out_flag: str = "OUT", source: str = "SOURCE") -> str:
    """``error`` as the one line (plus its listed differences) an entry point prints: the facts, then what
    to do. ``out_flag`` names the command's output argument, ``source`` its source."""
    if not isinstance(error, CacheError) or error.remedy is None:
        return str(error)
    text = error.headline if isinstance(error, CacheMismatchError) else str(error)
    url = error.url or out_flag
    teachers = list(getattr(error, "teachers", ()))
    advice = {
        "rebuild": f"rebuild it (`python -m pipeline.build {source} {url} --overwrite`) or restore it from a copy",
        "resume": "rerun its build command to finish it",
        "repair": (f"run `python -m cache.inspect {url} --verify`, then rebuild the shards it names with "
                   f"`python -m pipeline.build {source} {url} --repair`"),
        "reconvert": f"convert it again (`python -m cache.convert SRC {url} --format FORMAT`) or restore it from a copy",
        "settings": "rerun with the same settings to resume, choose another " + out_flag + ", or pass --overwrite to "
                    "rebuild it",
        "replace": f"choose another {out_flag}, or pass --overwrite to replace it",
        "addition": (f"rerun that addition's command (its --teacher lists them) to finish it, or drop it with "
                     f"`python -m cache.edit {url} --drop-teacher {','.join(teachers) or 'NAME'}`"),
        "restart": "restart to read the cache as it is now",
        "store": ("check the store's settings (--store-endpoint, --store-region, --store-allow-http for a plain-http "
                  "endpoint, or AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP; the credentials AWS_ACCESS_KEY_ID and "
                  "AWS_SECRET_ACCESS_KEY in the environment; see docs/remote.md), that the server is up and that the "
                  "bucket exists"),
        "client": "install the store's client: pip install -e '.[remote]' (obstore; s3fs for other fsspec URLs)",
        "space": (f"free space on the disk that holds {url} (`df -h {os.path.dirname(os.path.abspath(url))}`), then "
                  f"run the same command again (it keeps what {url} already holds), or delete {url} to give its "
                  "space back"),
    }[error.remedy]
    wanted = list(getattr(error, "wanted", ()))
    if isinstance(error, CacheMismatchError) and error.remedy == "settings" and wanted and set(teachers) != set(wanted):
        listed = teachers + [t for t in wanted if t not in teachers]
        advice = (f"(the cache holds teachers {', '.join(teachers)}: to add teachers, list those too, e.g. "
                  f"--teacher {','.join(listed)}; to remove one, `python -m cache.edit {url} --drop-teacher "
                  f"NAME`); " + advice)
    diffs = getattr(error, "differences", ())
    return f"{text}; {advice}" + ("" if not diffs else ":\n  " + "\n  ".join(diffs))


def explain_os_error(error: OSError, *, what: str) -> str:
    """A failed write or read of ``what`` (e.g. "the cache OUT") as one line: the file, the cause, what to do."""
    where = error.filename or what
    cause = error.strerror or str(error)
    advice = {
        errno.ENOSPC: "free space there (or choose another place) and rerun the same command: it resumes",
        errno.EDQUOT: "free space there (or choose another place) and rerun the same command: it resumes",
        errno.EROFS: "the file system is read-only: choose a writable place, or mount it read-write",
        errno.EACCES: "fix its permissions or choose another place",
        errno.EPERM: "fix its permissions or choose another place",
    }.get(error.errno, "")
    return f"{what}: cannot write {where}: {cause}" + (f"; {advice}" if advice else "")


def problem_advice(remedy: str | None, url: str) -> str:
    """What to do about one problem ``cache.inspect --verify`` found (empty when nothing applies)."""
    if remedy == "repair":
        return f"rebuild it with `python -m pipeline.build SOURCE {url} --repair`"
    if remedy == "resume":
        return "rerun the build command"
    if remedy == "reconvert":
        return "convert the cache again"
    if remedy == "rebuild":
        return f"rebuild it (`python -m pipeline.build SOURCE {url} --overwrite`)"
    return ""
