"""docs/sizing.md: its tables are what tools.bench.sizing computes (from the build's layout and the measured
rates it names), and those sizes are the build's."""

from pathlib import Path

from tools.bench import sizing

ROOT = Path(__file__).resolve().parents[1]


def test_docs_sizing_holds_the_computed_tables():
    text = (ROOT / "docs" / "sizing.md").read_text()
    assert sizing.markdown() in text, "docs/sizing.md differs from `python -m tools.bench.sizing`: paste its output"


def test_sizes_are_the_layouts():
    b = sizing.bytes_per_image("DINOv2-B", "fp16")
    assert 8 * 32 * 32 * 2 < b["latents"] < 8 * 32 * 32 * 2 + 2  # moments, plus a share of the shard indexes
    assert 256 * 768 * 2 < b["tokens"] < 256 * 768 * 2 + 2
    q = sizing.bytes_per_image("DINOv2-B", "int8")
    assert 256 * 768 + 256 * 4 < q["tokens"] < 256 * 768 + 256 * 4 + 3  # values and one float32 scale per token
    totals = {(t["teacher"], t["dtype"], t["variants"]): t["bytes"] for t in sizing.imagenet_totals()}
    assert round(totals["DINOv2-B", "fp16", 1] / 1e9) == 525 and round(totals["DINOv2-B", "int8", 1] / 1e9) == 274
    t = sizing.team(8, sizing.STEP_RATES[0], b["sample"])
    assert t["nodes"] == 1 and t["gets_permutation"] == 16 * sizing.STEP_RATES[0].img_s
    assert abs(sizing.build_hours(sizing.BUILD_RATES[0], variants=2) - 2 * sizing.build_hours(sizing.BUILD_RATES[0])) < 1e-9
