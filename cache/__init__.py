"""Feature cache: SD-VAE latent moments and teacher patch tokens, encoded once, read fast.

    >>> import cache
    >>> c = cache.open_cache("imagenet256.zarr")
    >>> for batch in c.loader(256, seed=0, epoch=0):
    ...     batch["latents"], batch["features"]["vit_base_patch14_dinov2.lvd142m"], batch["labels"]

Who owns what:

    layout.py      the logical layout of every cache: rows, shapes (the one shape table), token dtypes
    manifest.py    the typed manifest a build records, and the check every reader applies to it
    errors.py      the errors, carrying facts and which kind of remedy applies
    reader.py      the reader contract every format fulfils (row readers or a batch source, verify)
    writer.py      the copy-writer contract and the registry entry of a format
    formats/       one module (or folder) per format: zarr/ (the build's), hdf5.py, ffcv/; the registry
                   (open_cache, detect_format) in formats/__init__.py
    loader.py      the batch order (seed, epoch): a permutation, or shuffled blocks for stores; ranks, resume,
                   prefetching reads: names no format
    torch_data.py  the cache as torch.utils.data datasets (CacheDataset, CacheBatches)
    quant.py       int8 tokens: the maths
    files.py, diff.py   local files (checksums, atomic JSON, stamps), differences between records
    inspect.py, convert.py, edit.py   the cache's own commands (python -m cache.inspect|convert|edit)
    cli/           what every entry point of the project shares (config dataclass -> CLI, process set-up,
                   the advice for this package's errors)
"""

from .errors import CacheChangedError, CacheError, CacheMismatchError, ShardReadError
from .formats import FORMATS, detect_format, open_cache
from .formats.zarr import CacheWriter, ZarrCache, ZarrStorage, zarr_layout
from .layout import Layout
from .loader import CacheLoader, block_order, epoch_flips, epoch_order, rank_batches
from .manifest import SCHEMA_VERSION, EncoderInfo, Manifest, ManifestError
from .reader import CacheReader, Problem
from .torch_data import CacheBatches, CacheDataset

__all__ = [
    "FORMATS",
    "SCHEMA_VERSION",
    "CacheBatches",
    "CacheChangedError",
    "CacheDataset",
    "CacheError",
    "CacheLoader",
    "CacheMismatchError",
    "CacheReader",
    "CacheWriter",
    "EncoderInfo",
    "Layout",
    "Manifest",
    "ManifestError",
    "Problem",
    "ShardReadError",
    "ZarrCache",
    "ZarrStorage",
    "block_order",
    "detect_format",
    "epoch_flips",
    "epoch_order",
    "open_cache",
    "rank_batches",
    "zarr_layout",
]
