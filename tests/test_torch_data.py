"""cache.torch_data: the map-style and batch datasets give CacheLoader's rows, and a REPA-style loop
(docs/reuse.md) trains from them."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common.formats import as_format
from common.synthetic import expected_latent, synthetic_cache
from torch import nn
from torch.utils.data import DataLoader

import cache
from cache import CacheBatches, CacheDataset, CacheLoader, ShardReadError, epoch_order


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("s") / "c.zarr")  # rows 3, 50, 51 skipped; 2 variants


def assert_same_batch(a: dict, b: dict) -> None:
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["flip"], b["flip"]) and torch.equal(a["latents"], b["latents"])
    assert a["features"].keys() == b["features"].keys()
    assert all(torch.equal(a["features"][k], b["features"][k]) for k in a["features"])


def test_items_are_the_data_rows(synth):
    ds = CacheDataset(synth)
    assert len(ds) == 97 and ds[3]["index"].item() == 4  # skipped row 3 is not indexed
    assert [int(ds[i]["index"]) for i in range(len(ds))] == synth.rows.tolist()
    item = ds[49]  # row 52, after the skipped 50 and 51
    assert int(item["index"]) == 52 and int(item["labels"]) == synth.labels[52] and not item["flip"]
    assert item["latents"].dtype == torch.float16 and item["latents"].shape == (8, 2, 2)
    assert torch.all(item["latents"] == torch.tensor(expected_latent(52, 0)))
    assert item["features"]["t_a"].shape == (6, 5) and torch.all(item["features"]["t_b"] == expected_latent(52, 0) + 1)
    mirrored = CacheDataset(synth, variant=1, teachers=["t_b"])[49]
    assert mirrored["flip"] and list(mirrored["features"]) == ["t_b"]
    assert torch.all(mirrored["latents"] == torch.tensor(expected_latent(52, 1)))
    torch.manual_seed(0)
    drawn = {bool(CacheDataset(synth, variant="random")[0]["flip"]) for _ in range(20)}
    assert drawn == {False, True}
    with pytest.raises(IndexError):
        ds[97]
    with pytest.raises(ValueError, match="unknown teachers"):
        CacheDataset(synth, teachers=["dinov2"])
    with pytest.raises(ValueError, match="variant"):
        CacheDataset(synth, variant=2)


def test_dataloader_over_items_matches_cacheloader(synth):
    """The epoch order as a sampler: collated items are CacheLoader's batches, one for one."""
    positions = np.searchsorted(synth.rows, epoch_order(synth.rows, seed=3, epoch=1))
    got = list(DataLoader(CacheDataset(synth), batch_size=16, sampler=positions.tolist(), drop_last=True,
                          num_workers=2))
    want = list(CacheLoader(synth, 16, seed=3, epoch=1, num_workers=1))
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        assert_same_batch(a, b)


def test_batches_match_cacheloader_for_ranks_epochs_and_workers(synth):
    ds = CacheBatches(synth, 8, seed=5, num_workers=1)
    ds.set_epoch(2)
    want = list(CacheLoader(synth, 8, seed=5, epoch=2, num_workers=1))
    for workers in (0, 2):  # with workers, the DataLoader's round robin restores the order
        got = list(DataLoader(ds, batch_size=None, num_workers=workers))
        assert len(got) == len(ds) == len(want) == 12
        for a, b in zip(got, want):
            assert_same_batch(a, b)
    ds.set_epoch(2, start=40)  # resume inside the epoch
    assert_same_batch(next(iter(ds)), next(iter(CacheLoader(synth, 8, seed=5, epoch=2, start=40, num_workers=1))))
    half = CacheBatches(synth, 4, seed=5, rank=1, world_size=2, flip=True, num_workers=1)
    want = list(CacheLoader(synth, 4, seed=5, rank=1, world_size=2, flip=True, num_workers=1))
    assert [b["index"].tolist() for b in half] == [b["index"].tolist() for b in want]


def test_rank_and_world_come_from_torch_distributed(synth, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    ds = CacheBatches(synth, 4, seed=0, num_workers=1)
    assert (ds.rank, ds.world_size) == (1, 3)
    want = [b["index"].tolist() for b in CacheLoader(synth, 4, seed=0, rank=1, world_size=3, num_workers=1)]
    assert [b["index"].tolist() for b in DataLoader(ds, batch_size=None)] == want
    with pytest.raises(ValueError, match="both rank and world_size"):
        CacheBatches(synth, 4, rank=0)


def test_datasets_pickle_by_url_and_refuse_a_missing_shard(tmp_path):
    c = synthetic_cache(tmp_path / "c.zarr", n=32, skipped=())
    ds = CacheDataset(c)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.cache is not c and copy.cache.url == c.url
    assert_same_batch(copy[5], ds[5])
    key = f"{c.latents.path}/c/1/0/0/0/0"  # shard 1 of the latents (rows 16-31)
    (tmp_path / "c.zarr" / key).unlink()
    with pytest.raises(ShardReadError, match="missing"):
        CacheDataset(c)[20]


def test_hdf5_and_ffcv_caches(tmp_path):
    """HDF5 and FFCV: both datasets, the same rows as zarr's (FFCV's rows are read by byte range from its .beton)."""
    z = synthetic_cache(tmp_path / "c.zarr", n=32, skipped=(5,))
    want = list(CacheBatches(z, 8, seed=1, flip=True, rank=0, world_size=1, num_workers=1))
    h5 = as_format(z.url, "hdf5", tmp_path)
    ds = CacheDataset(h5, variant=1)
    assert_same_batch(ds[7], CacheDataset(z, variant=1)[7])
    assert_same_batch(pickle.loads(pickle.dumps(ds))[7], ds[7])
    for got, exp in zip(CacheBatches(h5, 8, seed=1, flip=True, rank=0, world_size=1, num_workers=1), want, strict=True):
        assert_same_batch(got, exp)
    ff = as_format(z.url, "ffcv", tmp_path)
    for got, exp in zip(CacheBatches(ff, 8, seed=1, flip=True, rank=0, world_size=1, num_workers=1), want, strict=True):
        assert_same_batch(got, exp)
    assert_same_batch(CacheDataset(ff, variant=1)[7], CacheDataset(z, variant=1)[7])


# ----------------------------------------------------------------------------------------------
# A REPA-style loop (sihyun-yu/REPA train.py) with its image dataset and online encoders swapped for
# the cache, as docs/reuse.md describes.


class TinyDenoiser(nn.Module):
    """Patch 2 on the latent, an MLP per token; its hidden tokens feed REPA's projector."""

    def __init__(self, channels: int, num_classes: int, teacher_dim: int, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(channels * 4, width)
        self.cond = nn.Embedding(num_classes, width)
        self.time = nn.Linear(1, width)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, channels * 4)
        self.projector = nn.Sequential(nn.Linear(width, 128), nn.SiLU(), nn.Linear(128, teacher_dim))

    def forward(self, x, t, y):
        b, c, h, w = x.shape
        tokens = F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2)  # (B, h/2 * w/2, 4C), row-major
        hidden = self.body(self.embed(tokens) + self.cond(y)[:, None] + self.time(t[:, None, None]))
        out = F.pixel_shuffle(self.out(hidden).transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2), 2)
        return out, self.projector(hidden)


def repa_projection_loss(zs_tilde, zs):
    """REPA's loss.py: minus the mean cosine similarity of projected and teacher tokens."""
    return -(F.normalize(zs, dim=-1) * F.normalize(zs_tilde, dim=-1)).sum(dim=-1).mean()


def repa_loop(loader, epochs, teacher, set_epoch=None):
    torch.manual_seed(0)
    model = None
    proj_losses = []
    for epoch in range(epochs):
        if set_epoch:
            set_epoch(epoch)
        for batch in loader:
            mean, std = batch["latents"].float().chunk(2, dim=1)
            x = (mean + std * torch.randn_like(mean)) * 0.18215  # was: vae.encode(x).latent_dist.sample() * 0.18215
            zs = batch["features"][teacher].float()  # was: encoder.forward_features(preprocess(raw_image))
            y = batch["labels"]
            if model is None:
                model = TinyDenoiser(x.shape[1], 4, zs.shape[-1])
                opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            t = torch.rand(x.shape[0])
            noise = torch.randn_like(x)
            x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
            v, zs_tilde = model(x_t, t, y)
            proj = repa_projection_loss(zs_tilde, zs)
            loss = F.mse_loss(v, noise - x) + 0.5 * proj
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss)
            proj_losses.append(proj.item())
    return proj_losses


def test_repa_style_loop_trains_from_either_dataset(built_cache):
    c = cache.open_cache(built_cache)
    teacher = "tiny"
    items = DataLoader(CacheDataset(c, teachers=[teacher], variant="random"), batch_size=8, shuffle=True,
                       drop_last=True, generator=torch.Generator().manual_seed(0))
    batches = CacheBatches(c, 8, teachers=[teacher], flip=True, num_workers=1)
    for losses in (repa_loop(items, 8, teacher),
                   repa_loop(DataLoader(batches, batch_size=None), 8, teacher, set_epoch=batches.set_epoch)):
        assert len(losses) == 24  # 24 images, batches of 8, 8 epochs
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses  # the projector aligns to the tokens
