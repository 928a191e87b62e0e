"""Two nodes on one machine, as a user launches them on two hosts: `torchrun --nnodes 2 --nproc-per-node 1
--node-rank 0|1 --master-addr 127.0.0.1 --master-port PORT`, gloo on the CPU, both reading and writing one
bucket of the real S3 server and sharing no folder (each node its own run folder and its own node-local
copy). The build writes the same shard bytes as a one-process build; training gives the losses of one
process; a rerun whose nodes find different checkpoints (no shared run folder) is refused, naming why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from common.s3 import free_ports, server_store
from conftest import ROOT, TINY_BUILD, _env
from test_remote_cli import TRAIN, _losses

pytestmark = [pytest.mark.remote, pytest.mark.slow]
obstore = pytest.importorskip("obstore", reason="obstore is not installed (the remote extra)")


def _two_nodes(module: list[str], env: dict, logs: Path, *, node_args: list[list[str]] | None = None,
               check: bool = True) -> list[subprocess.CompletedProcess]:
    """``module`` launched as two nodes of one process each (node_args[i]: node i's own arguments); their
    output goes to files in ``logs`` (a pipe left unread could stall one node, and the other with it)."""
    port = free_ports(1)[0]
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for node in range(2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        cmd = [*launcher, "-m", *module, *((node_args or [[], []])[node])]
        with open(logs / f"node{node}.out", "w") as out, open(logs / f"node{node}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=out, stderr=err))
    done = []
    for node, p in enumerate(procs):
        p.wait(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, (logs / f"node{node}.out").read_text(),
                                                (logs / f"node{node}.err").read_text()))
    if check:
        for node, d in enumerate(done):
            assert d.returncode == 0, f"node {node} failed ({d.returncode}):\n{d.stdout[-2000:]}\n{d.stderr[-4000:]}"
    return done


def test_two_nodes_build_and_train_on_one_bucket(image_folder, built_cache, s3_server, tmp_path):
    env = s3_server.env
    url = s3_server.url("nodes/c.zarr")
    built = _two_nodes(["pipeline.build", str(image_folder), url, *TINY_BUILD, "--flip", "both"], env, tmp_path / "b")
    assert "2 process(es)" in built[0].stderr
    store = server_store(s3_server)
    objects = {o["path"].removeprefix("nodes/c.zarr/") for batch in obstore.list(store, prefix="nodes/c.zarr/")
               for o in batch}
    local = {p.relative_to(built_cache).as_posix(): p for p in built_cache.rglob("*") if p.is_file()}
    data = [k for k in local if k.startswith(("latents/c/", "features/", "labels/c/")) and "/c/" in k]
    assert data and set(data) <= objects
    for key in data:  # each node wrote its own shards; together the bytes of one process's build
        assert bytes(obstore.get(store, f"nodes/c.zarr/{key}").bytes()) == local[key].read_bytes(), key
    shards = [k for k in objects if k.startswith("build/progress/")]
    assert len(shards) == len([k for k in data if k.startswith("latents/c/")])

    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "trainer.train", "--cache", str(built_cache), "--out", str(one), *TRAIN],
                   cwd=ROOT, env=_env(env), check=True, capture_output=True, timeout=600)
    outs = [tmp_path / f"node{n}" / "run" for n in range(2)]  # no shared disk: a run folder and a copy per node
    node_args = [["--out", str(outs[n]), "--cache-local", str(tmp_path / f"node{n}" / "copy")] for n in range(2)]
    _two_nodes(["trainer.train", "--cache", url, *TRAIN], env, tmp_path / "t", node_args=node_args)
    got, want = _losses(outs[0]), _losses(one)
    assert [r[0] for r in got] == [r[0] for r in want] == [1, 2, 3]
    np.testing.assert_allclose([r[1:] for r in got], [r[1:] for r in want], rtol=1e-4)
    for n in range(2):  # each node downloaded the shard objects it read into its own folder
        assert any(Path(tmp_path / f"node{n}" / "copy" / "objects").rglob("0.crc32c-*"))

    again = _two_nodes(["trainer.train", "--cache", url, *TRAIN, "--steps", "4"], env, tmp_path / "r",
                       node_args=node_args, check=False)
    for d in again:  # every node stops (torchrun reports its process' exit status 2 as a failure)
        assert d.returncode != 0
        assert "different checkpoints to resume from (step by rank: [3, 0])" in d.stderr, d.stderr[-3000:]
        assert "file system every node sees" in d.stderr
