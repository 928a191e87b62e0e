"""Change a finished zarr cache in place without re-encoding what stays: drop a teacher.

    python -m cache.edit PATH --drop-teacher NAME[,NAME...] [--dry-run]

Dropping a teacher removes it from the manifest first (readers opened from then on do not see it),
then deletes its token (and int8 scale) arrays and its checksums in the progress records; every other
array keeps its bytes. It also removes a teacher whose addition is unfinished. A teacher is added by
running the build again with the cache's teachers and the new one
(``python -m pipeline.build SOURCE PATH --teacher OLD,NEW``), which encodes only the new teacher. Do
not drop a teacher while a job reads it. HDF5 and FFCV caches are converted copies: edit the zarr
cache and convert again (``python -m cache.convert``). PATH may be in an object store
(``s3://bucket/c.zarr``): there the teacher's objects are deleted by key, and no other object under the
prefix is touched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .cli.advice import explain, explain_os_error
from .cli.config import ConfigError, StoreSettings, check_fields, parse_config
from .errors import CacheError
from .formats import detect_format
from .formats.zarr import CacheWriter

__all__ = ["EditConfig", "main"]


@dataclass(frozen=True)
class EditConfig(StoreSettings):
    """Change a finished zarr cache in place: drop teachers."""

    path: str = field(default="", metadata={"help": "cache location (pipeline.build OUT: a folder or store URL)"})
    drop_teacher: str = field(default="", metadata={
        "help": "comma-separated teachers to remove (their arrays are deleted; the other arrays are untouched)"})

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("give the cache PATH")
        if not self.teachers:
            raise ConfigError("nothing to do: give --drop-teacher NAME")
        check_fields(self)
        self.check_store(self.path)

    @property
    def teachers(self) -> list[str]:
        return [t.strip() for t in self.drop_teacher.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    cfg, dry_run = parse_config(EditConfig, argv, positional=("path",), description=__doc__.splitlines()[0])
    if dry_run:
        return 0
    try:
        fmt = detect_format(cfg.path).name
        if fmt != "zarr":
            raise CacheError(f"{cfg.path} is an {fmt} cache, a converted copy: drop the teacher from the zarr cache "
                             "it was converted from and convert again (`python -m cache.convert`)")
        for name in cfg.teachers:
            manifest = CacheWriter.drop_teacher(cfg.path, name, storage_options=cfg.storage_options())
            print(f"dropped teacher {name}; {cfg.path} holds {', '.join(manifest.layout.teachers) or 'no teacher'}")
    except CacheError as e:
        print(f"error: {explain(e, out_flag='PATH')}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, a permission: one line, naming the path
        print(f"error: {explain_os_error(e, what=cfg.path)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
