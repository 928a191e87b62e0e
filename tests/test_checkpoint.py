"""Checkpoints (trainer.checkpoint): a bit-exact round trip, ordering, pruning, checksums, refusals."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from trainer.checkpoint import (
    CheckpointError,
    checkpoints,
    clean_partial,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from trainer.run import latest_checkpoint


def trained_state(seed: int = 0):
    """A small model, its EMA and an AdamW that has taken two steps (so every moment is non-zero)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 5)).square().mean().backward()
        opt.step()
    ema = {k: v.detach().clone().mul_(0.5) for k, v in model.state_dict().items()}
    ema["extra.bf16"] = torch.randn(3).to(torch.bfloat16)
    return model, ema, opt


def step_once(model, opt, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(8, 5, generator=g)).square().mean().backward()
    opt.step()


def make_folders(folder, names):
    for name in names:
        (folder / name).mkdir(parents=True)


def test_round_trip_of_weights_ema_and_optimizer_is_bit_exact(tmp_path):
    model, ema, opt = trained_state()
    path = save_checkpoint(str(tmp_path), 12, model=model.state_dict(), ema=ema, optimizer=opt,
                           state={"seed": 3, "images_seen": 96})
    assert os.path.basename(path) == "step-00000012"
    loaded = load_checkpoint(path)
    assert loaded["state"]["step"] == 12 and loaded["state"]["seed"] == 3 and loaded["state"]["images_seen"] == 96
    for saved, back in ((model.state_dict(), loaded["model"]), (ema, loaded["ema"])):
        assert set(saved) == set(back)
        for k, v in saved.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k

    # a fresh model and optimizer restored from the checkpoint take the same next step, bit for bit
    fresh, _, _ = trained_state(seed=5)
    fresh.load_state_dict(loaded["model"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    fresh_opt.load_state_dict(loaded["optimizer"])
    assert fresh_opt.param_groups[0]["lr"] == 1e-2 and tuple(fresh_opt.param_groups[0]["betas"]) == (0.9, 0.95)  # JSON: a list
    ref_state, new_state = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert set(ref_state) == set(new_state)
    for i in ref_state:
        for name, value in ref_state[i].items():
            assert torch.equal(torch.as_tensor(new_state[i][name]), torch.as_tensor(value)), (i, name)
    step_once(model, opt)
    step_once(fresh, fresh_opt)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    folder = tmp_path / "checkpoints"
    assert checkpoints(str(folder)) == [] and latest_checkpoint(str(folder)) is None
    make_folders(folder, ["step-00000002", "step-00000010", "step-00000009", "step-100000000",
                          ".tmp-step-00000099", ".trash-step-00000098", "step-7", "notes"])
    (folder / "step-00000050.txt").write_text("not a folder name we write")
    names = [os.path.basename(p) for p in checkpoints(str(folder))]
    assert names == ["step-100000000", "step-00000010", "step-00000009", "step-00000002"]
    assert latest_checkpoint(str(folder)) == str(folder / "step-100000000")


@pytest.mark.parametrize("keep, left", [(2, ["step-00000008", "step-00000006"]), (1, ["step-00000008"]),
                                        (0, ["step-00000008", "step-00000006", "step-00000004", "step-00000002"]),
                                        (9, ["step-00000008", "step-00000006", "step-00000004", "step-00000002"])])
def test_prune_keeps_the_newest(tmp_path, keep, left):
    folder = tmp_path / "checkpoints"
    make_folders(folder, ["step-00000004", "step-00000008", "step-00000002", "step-00000006"])
    prune_checkpoints(str(folder), keep)
    assert [os.path.basename(p) for p in checkpoints(str(folder))] == left
    assert sorted(os.listdir(folder)) == sorted(left)


def test_clean_partial_removes_only_its_own_leftovers(tmp_path):
    folder = tmp_path / "checkpoints"
    make_folders(folder, ["step-00000002", ".tmp-step-00000004", ".trash-step-00000001", "mine"])
    clean_partial(str(folder))
    assert sorted(os.listdir(folder)) == ["mine", "step-00000002"]


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"])
def test_manifest_checksums_catch_a_flipped_byte_and_a_cut_file(tmp_path, name):
    model, ema, opt = trained_state()
    path = save_checkpoint(str(tmp_path), 4, model=model.state_dict(), ema=ema, optimizer=opt, state={})
    manifest = json.loads((tmp_path / "step-00000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and set(manifest["files"]) == {"model.safetensors", "ema.safetensors",
                                                                 "optimizer.safetensors", "state.json"}
    file = os.path.join(path, name)
    data = bytearray(open(file, "rb").read())
    data[-2] ^= 0x01
    open(file, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} does not match the sha256"):
        load_checkpoint(path)
    open(file, "wb").write(bytes(data[:-5]))
    with pytest.raises(CheckpointError, match=f"{name} has {len(data) - 5} bytes, {len(data)} were written"):
        load_checkpoint(path)


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    model, ema, opt = trained_state()
    save_checkpoint(str(tmp_path), 2, model=model.state_dict(), ema=ema, optimizer=opt, state={"run": "a"})
    step_once(model, opt)
    path = save_checkpoint(str(tmp_path), 2, model=model.state_dict(), ema=ema, optimizer=opt, state={"run": "b"})
    loaded = load_checkpoint(path)
    assert loaded["state"]["run"] == "b" and torch.equal(loaded["model"]["0.weight"], model.state_dict()["0.weight"])
    assert sorted(os.listdir(tmp_path)) == ["step-00000002"]


def test_non_finite_weights_are_never_saved(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match=r"step 7: the EMA weights hold NaN or infinite values \(w\)"):
        save_checkpoint(str(tmp_path), 7, model={"w": torch.zeros(2)}, ema={"w": torch.tensor([0.0, float("inf")])},
                        optimizer=opt, state={})
    assert os.listdir(tmp_path) == []


def test_pruning_renames_before_deleting_and_keeps_the_newest(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (folder / f"step-{step:08d}").mkdir(parents=True)
        (folder / f"step-{step:08d}" / "model.safetensors").write_bytes(b"x")
    removed = []
    real_rmtree = shutil.rmtree

    def spy(path, *a, **kw):
        removed.append(os.path.basename(path))
        return real_rmtree(path, *a, **kw)

    shutil.rmtree = spy
    try:
        prune_checkpoints(str(folder), 1)
    finally:
        shutil.rmtree = real_rmtree
    assert sorted(os.listdir(folder)) == ["step-00000006"]
    assert set(removed) == {".trash-step-00000002", ".trash-step-00000004"}  # never a step-* in place
