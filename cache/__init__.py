"""Feature cache: SD-VAE latent moments and teacher patch tokens in a sharded zarr v3 store.

    >>> import cache
    >>> c = cache.open_cache("imagenet256.zarr")
    >>> for batch in c.loader(256, seed=0, epoch=0):
    ...     batch["latents"], batch["features"]["vit_base_patch14_dinov2.lvd142m"], batch["labels"]

``cache.store`` defines the layout of a cache, ``cache.manifest`` the typed manifest a build records, ``cache.shardfile`` alone knows zarr's shard byte
format (for direct byte-range reads and writes), ``cache.loader`` the batch order and the reads,
``python -m cache.inspect`` prints and verifies a cache, ``cache.torch_data`` offers the cache as
``torch.utils.data`` datasets (:class:`CacheDataset`, :class:`CacheBatches`) for other training code.
"""

from .loader import CacheLoader, ShardReadError, epoch_flips, epoch_order, rank_batches
from .manifest import EncoderInfo, Manifest, ManifestError
from .store import (
    SCHEMA_VERSION,
    Cache,
    CacheChangedError,
    CacheError,
    CacheMismatchError,
    CacheWriter,
    Layout,
    ShardDamage,
    open_cache,
)
from .torch_data import CacheBatches, CacheDataset

__all__ = [
    "SCHEMA_VERSION",
    "Cache",
    "CacheBatches",
    "CacheChangedError",
    "CacheDataset",
    "CacheError",
    "CacheLoader",
    "CacheMismatchError",
    "CacheWriter",
    "EncoderInfo",
    "Layout",
    "Manifest",
    "ManifestError",
    "ShardDamage",
    "ShardReadError",
    "epoch_flips",
    "epoch_order",
    "open_cache",
    "rank_batches",
]
