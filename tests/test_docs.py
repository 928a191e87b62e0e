"""What README and docs/ promise, held against the code: the README's Python API snippet runs as written on
a demo-sized cache, and every committed ``docs/*-help.txt`` equals its entry point's ``--help``."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELP_FILES = {"build": "pipeline.build", "train": "trainer.train", "sample": "tools.sample",
              "evaluate": "tools.evaluate", "inspect": "cache.inspect", "edit": "cache.edit",
              "convert": "cache.convert"}


def test_readme_python_api_snippet_runs_as_written(built_cache, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reusing a cache (Python API)"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"demo/cache.zarr"' in code
    demo = built_cache.parent / "demo"
    (demo / "demo").mkdir(parents=True, exist_ok=True)
    target = demo / "demo" / "cache.zarr"
    if not target.exists():
        target.symlink_to(built_cache)
    monkeypatch.chdir(demo)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["z"].dtype.is_floating_point and namespace["y"].ndim == 3
    out = capsys.readouterr().out
    assert str(len(namespace["c"])) in out


def test_a_wrong_teacher_name_lists_the_teachers(built_cache):
    import cache

    c = cache.open_cache(built_cache)
    with pytest.raises(KeyError, match="the teachers are 'tiny'"):
        c.features["vit_base_patch14_dinov2.lvd142m"]
    batch = next(iter(c.loader(2, num_workers=1)))
    with pytest.raises(KeyError, match="the teachers are 'tiny'"):
        batch["features"]["vit_base_patch14_dinov2.lvd142m"]


@pytest.mark.parametrize("name", sorted(HELP_FILES))
def test_committed_help_equals_the_entry_point(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    module = importlib.import_module(HELP_FILES[name])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    committed = (ROOT / "docs" / f"{name}-help.txt").read_text()
    assert out.getvalue() == committed, (f"docs/{name}-help.txt differs from `python -m {HELP_FILES[name]} --help`: "
                                         f"regenerate it with COLUMNS=80")
    assert out.getvalue().startswith(f"usage: python -m {HELP_FILES[name]} ")
    assert os.environ["COLUMNS"] == "80"
