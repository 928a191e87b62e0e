"""Any timm ViT as a teacher: the contract of docs/teachers.md against timm's own forward, refusals, a build
and two training steps per teacher, and the trainer's refusal of a grid it cannot upsample to."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_build

import cache
from pipeline.encoders import (
    check_teacher_architecture,
    load_teacher,
    teacher_grid,
    teacher_input_size,
    teacher_name,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
TINY_KW = dict(embed_dim=96, depth=2, num_heads=3)

# timm name, patch, class tokens, register tokens, (mean, std) the model was trained with
TEACHERS = [
    ("vit_small_patch14_reg4_dinov2", 14, 1, 4, IMAGENET),
    ("vit_base_patch16_siglip_256", 16, 0, 0, HALF),
    ("vit_base_patch16_clip_224.openai", 16, 1, 0, OPENAI_CLIP),
    ("vit_base_patch16_224.mae", 16, 1, 0, IMAGENET),
]


def test_input_size_rule_gives_every_teacher_the_students_outer_grid():
    assert [teacher_grid(r) for r in (64, 256, 512)] == [4, 16, 32]
    assert teacher_input_size(256) == 224 and teacher_input_size(512) == 448  # DINOv2: REPA's sizes
    assert teacher_input_size(256, 16) == 256 and teacher_input_size(512, 16) == 512
    assert teacher_input_size(256, 8) == 128


def timm_reference(name: str, images: torch.Tensor, *, patch: int, prefix: int, norm, kwargs, seed=0) -> torch.Tensor:
    """The same model built straight from timm, its table resampled by timm's own set_input_size (REPA's way),
    the input normalised with the constants above: forward_features with the first ``prefix`` tokens sliced off."""
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    size = 4 * patch  # 64 px: 4 tokens per side
    vit.set_input_size(img_size=(size, size))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    x = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    with torch.no_grad():
        return vit.forward_features(x)[:, prefix:]


@pytest.mark.parametrize("name,patch,cls,regs,norm", TEACHERS, ids=[t[0] for t in TEACHERS])
def test_tiny_teacher_is_timms_forward_with_prefix_removed(name, patch, cls, regs, norm):
    t = load_teacher(f"tiny:{name}", resolution=64)
    info = t.info
    assert info["grid"] == 4 and info["tokens"] == 16 and info["input_size"] == 4 * patch
    assert info["patch_size"] == patch and info["dim"] == 96
    assert (info["num_class_tokens"], info["num_register_tokens"], info["num_prefix_tokens"]) == (cls, regs, cls + regs)
    np.testing.assert_allclose(info["mean"], norm[0])
    np.testing.assert_allclose(info["std"], norm[1])
    assert info["random_weights"] and teacher_name(f"tiny:{name}") == f"tiny-{name}"
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = t.module(images)
    ref = timm_reference(name, images, patch=patch, prefix=cls + regs, norm=norm, kwargs=TINY_KW)
    assert tokens.shape == ref.shape == (2, 16, 96)
    torch.testing.assert_close(tokens, ref, rtol=1e-4, atol=1e-4)
    if norm != IMAGENET:  # the model's own mean/std matter: ImageNet's give other tokens
        wrong = timm_reference(name, images, patch=patch, prefix=cls + regs, norm=IMAGENET, kwargs=TINY_KW)
        assert not torch.allclose(tokens, wrong, atol=1e-3)


def test_full_size_random_teacher_with_registers():
    t = load_teacher("random:vit_small_patch14_reg4_dinov2", resolution=64)
    assert t.info["pos_embed_source_grid"] == 37 and t.info["pretrained_input_size"] == [518, 518]
    images = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        tokens = t.module(images)
    ref = timm_reference("vit_small_patch14_reg4_dinov2", images, patch=14, prefix=5, norm=IMAGENET, kwargs={})
    assert tokens.shape == (1, 16, 384)
    torch.testing.assert_close(tokens, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec,match", [
    ("tiny:resnet18", "ResNet is not timm's VisionTransformer"),
    ("tiny:vit_base_patch16_rope_224", "RoPE"),
    ("tiny:eva02_tiny_patch14_224", "RoPE"),
    ("tiny:vit_base_r50_s16_224", "HybridEmbed"),
])
def test_architectures_outside_the_contract_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        load_teacher(spec, resolution=64)


def test_vit_without_a_position_table_or_square_grid_is_refused():
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ValueError, match="no absolute position table"):
        check_teacher_architecture(VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=3,
                                                     pos_embed="none"), "nope")
    with pytest.raises(ValueError, match="non-square 2x3 grid"):
        check_teacher_architecture(VisionTransformer(img_size=(32, 48), patch_size=16, embed_dim=48, depth=1,
                                                     num_heads=3), "wide")
    with pytest.raises(ValueError, match="dynamic_img_size"):
        check_teacher_architecture(VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=3,
                                                     dynamic_img_size=True), "dyn")


@pytest.fixture(scope="module")
def teachers_cache(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers") / "c.zarr"
    run_build(image_folder, out, "--teacher", ",".join(f"tiny:{t[0]}" for t in TEACHERS))
    return out


@pytest.mark.parametrize("name,patch,cls,regs,norm", TEACHERS, ids=[t[0] for t in TEACHERS])
def test_build_records_the_contract_and_training_aligns_to_it(teachers_cache, tmp_path, name, patch, cls, regs, norm):
    from trainer.train import TrainConfig, train

    stored = f"tiny-{name}"
    c = cache.open_cache(teachers_cache)
    assert c.features[stored].shape[2:] == (16, 96)
    info = c.manifest.teachers[stored].to_dict()  # the typed info keeps the teacher keys in extra
    assert (info["grid"], info["input_size"], info["num_register_tokens"]) == (4, 4 * patch, regs)
    np.testing.assert_allclose(info["mean"], norm[0])
    result = train(TrainConfig(cache=str(teachers_cache), out=str(tmp_path / "run"), model="tiny", batch_size=8,
                               steps=2, precision="fp32", device="cpu", log_every=1, ckpt_every=2, loader_workers=1,
                               tensorboard=False, teacher=stored))
    assert result["step"] == 2 and np.isfinite(result["metrics"]["loss_align"])
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["teacher_dim"] == 96 and cfg["model"]["teacher_grid"] == 4
    assert cfg["cache"]["teacher"] == stored


def test_trainer_refuses_a_teacher_grid_it_cannot_upsample_to(tmp_path):
    """A 3x3 teacher grid against the tiny model's 2x2 middle grid (8x8 latents): not an integer ratio."""
    from trainer.train import SetupError, TrainConfig, train

    layout = cache.zarr_layout(num_rows=8, resolution=64, variants=1, teachers={"odd": (9, 6)}, shard_rows=8, chunk_rows=4)
    sources = [{"path": f"c{i % 2}/{i}.jpg", "size": 1, "label": i % 2} for i in range(8)]
    manifest = {"classes": ["c0", "c1"], "source": {"fingerprint": "x"}, "vae": {}, "teachers": {}}
    writer, _ = cache.CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=layout, manifest=manifest,
                                                   sources=sources)
    writer.write_shard(0, latents=np.zeros((8, 1, 8, 8, 8), np.float16),
                       features={"odd": np.ones((8, 1, 9, 6), np.float16)},
                       labels=np.array([s["label"] for s in sources], np.int32), skipped=[])
    writer.finalize({"seconds": 0})
    with pytest.raises(SetupError, match=r"teacher_grid 3 \(a 3x3 token grid\) is not an integer multiple of the 2x2 student grid") as e:
        train(TrainConfig(cache=str(tmp_path / "c.zarr"), out=str(tmp_path / "run"), model="tiny", batch_size=4,
                          steps=1, precision="fp32", device="cpu", tensorboard=False))
    assert "resolution/16 tokens per side" in str(e.value) and "align_block" in str(e.value)
