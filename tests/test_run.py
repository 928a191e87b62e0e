"""The run folder's records and shared pieces: RunRecord, LatentTransform, precision, upstream random weights."""

from __future__ import annotations

import json

import pytest
import torch

from cache.cli.runtime import PRECISIONS, apply_precision
from tools.evaluate import _random_weight_samples
from trainer.run import CacheIdentity, LatentTransform, RandomWeights, RunRecord


def _record(**cache) -> RunRecord:
    return RunRecord(train={"model": "tiny", "cache": "/c.zarr", "latent_scale": 0.5, "latent_shift": 0.25},
                     model={"width": 8, "patch": (2, 2)},
                     cache=CacheIdentity(source_fingerprint="f", vae_sha256="v", teacher="t", rows=4, resolution=64,
                                         **cache))


def test_run_record_round_trip():
    r = _record(random_weights=True, vae_random_weights=False, teacher_random_weights=True)
    d = r.to_dict()
    assert d["model"]["patch"] == [2, 2]  # as config.json reads back
    assert RunRecord.from_dict(d).to_dict() == d and json.loads(json.dumps(d)) == d
    old = {**d, "cache": {k: v for k, v in d["cache"].items() if k not in CacheIdentity.DERIVED}}
    assert RunRecord.from_dict(old).to_dict() == old  # a record from before the per-encoder flags
    assert RunRecord.from_dict(d).latent == LatentTransform(scale=0.5, shift=0.25)
    with pytest.raises(ValueError, match="does not know"):
        RunRecord.from_dict({**d, "typo": 1})


def test_latent_transform_both_directions_against_the_formulas():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.rand(3, 4, 5, 5, generator=g,
                                                                                       dtype=torch.float64)
    noise = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    t = LatentTransform(scale=0.18215, shift=0.1)
    x = t.encode(torch.cat([mean, std], 1).double(), noise)
    assert torch.allclose(x, (mean + std * noise - 0.1) * 0.18215, rtol=1e-6)
    z = t.decode(x.double())
    assert torch.allclose(z.double(), (x / 0.18215 + 0.1).float().double())
    assert torch.allclose(z.double(), mean + std * noise, atol=1e-5)


def test_precision_sets_tf32_and_autocast():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert apply_precision("fp32", torch.device("cpu")) is None
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert apply_precision("tf32", torch.device("cpu")) is None
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert apply_precision("bf16", torch.device("cpu")) is torch.bfloat16
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert apply_precision("fp16", torch.device("cpu")) is torch.float16
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(ValueError, match="fp16"):
            apply_precision("fp8", torch.device("cpu"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert PRECISIONS == ("fp32", "tf32", "bf16", "fp16")


@pytest.mark.parametrize("flags, warned", [
    (dict(vae_random_weights=False, teacher_random_weights=True, random_weights=True), True),
    (dict(vae_random_weights=True, teacher_random_weights=False, random_weights=True), True),
    (dict(vae_random_weights=False, teacher_random_weights=False, random_weights=False), False),
])
@pytest.mark.parametrize("decoder_random", [False, True])
def test_evaluate_reports_random_weights_anywhere_upstream(tmp_path, flags, warned, decoder_random):
    upstream = _record(**flags).random_weights(decoder_vae=decoder_random)
    record = {"samples": {}, "model": {"step": 1}, "vae": {"spec": "x", "random_weights": decoder_random},
              "upstream": upstream.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert _random_weight_samples(str(tmp_path / "samples.npz")) is (warned or decoder_random)
    assert RandomWeights.from_dict(record["upstream"]) == upstream
