"""What every command-line entry point of the project shares, kept apart from the cache formats:

    config.py   one frozen config dataclass per entry point -> argparse CLI, presets, ranges, --dry-run
    runtime.py  process set-up: the launcher's world, device and precision, logging, folder claims and locks,
                file hashing
    advice.py   the advice the entry points give for the errors of ``cache`` (the library raises facts)

Why inside ``cache/``: the entry points of every package need these (``pipeline.build``, ``trainer.train``,
``tools.*`` and the cache's own ``cache.inspect`` / ``convert`` / ``edit``), imports go one way
(``pipeline`` and ``trainer`` import ``cache``; nothing imports ``tools``; ``pipeline`` and ``trainer``
never import each other), and the top level holds the user's five folders only. So the one package all
of them may import is ``cache``, and the kit is a sub-package of it that no format module imports
(tests/test_imports.py holds both rules): the formats, the reader contract and the loader stay free of
command-line concerns.
"""
