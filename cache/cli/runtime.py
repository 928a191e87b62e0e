"""Process plumbing shared by the entry points (``pipeline.build``, ``trainer.train``, ``tools.*``).

The device fix-up for accelerate, the launcher's world, the one precision vocabulary, the one-time logging
setup, folder claims and locks, file hashing (:mod:`cache.cli` says why they live here); atomic JSON records
are :func:`cache.files.write_json`, used here and re-exported for the entry points.

Precision means the same in every entry point (``pipeline.build``, ``trainer.train``, ``tools.sample``;
``tools.evaluate`` always uses ``fp32``, so that its numbers compare across machines):

    fp32   strict float32: TF32 off for matmuls and convolutions
    tf32   float32 with TF32 matmuls and convolutions (on GPUs that have them)
    bf16   the networks under bfloat16 autocast; TF32 for what runs outside autocast
    fp16   the networks under float16 autocast (REPA's setting; training adds a dynamic gradient scaler);
           TF32 for what runs outside autocast
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Any

import torch

from ..files import write_json

__all__ = ["LOCK_FILE", "PRECISIONS", "FolderBusy", "FolderLock", "SetupError", "apply_precision", "autocast_dtype",
           "broadcast_from_rank0", "claim_folder", "configure_device", "file_sha256", "join_world", "lock_folder", "launched_world", "make_accelerator", "resolve_device", "setup_logging",
           "single_process", "write_json"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


class SetupError(RuntimeError):
    """An entry point cannot start (no run, a mismatch, changed settings on a rerun); says why."""


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the networks run under for ``precision``: ``torch.bfloat16`` for bf16, ``torch.float16`` for
    fp16, None (no autocast) otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def apply_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Set the process's TF32 switches for ``precision`` (see the module docstring) and return the autocast
    dtype the networks run under (:func:`autocast_dtype`). Every entry
    point calls this once, after :func:`configure_device`; nothing else touches the switches except
    ``tools.inception``, which holds them off around the Inception network."""
    dtype = autocast_dtype(precision)
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return dtype


def launched_world() -> tuple[int, str]:
    """How many processes the launcher says this one is part of, and the variable that says so: ``WORLD_SIZE``
    (torchrun, ``accelerate launch``; SLURM jobs that start torchrun per node too), else 1. SLURM tasks started
    without it (``srun`` with ``SLURM_NTASKS`` > 1 and a ``SLURM_PROCID``) cannot be joined, since nothing says
    where rank 0 listens: SetupError, so that they never run as N copies of one process."""
    env = os.environ
    if env.get("WORLD_SIZE"):
        try:
            n = int(env["WORLD_SIZE"])
        except ValueError:
            raise SetupError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not a number of processes") from None
        return n, f"WORLD_SIZE={n}"
    tasks = env.get("SLURM_NTASKS", "1")
    if "SLURM_PROCID" in env and tasks.isdigit() and int(tasks) > 1:
        raise SetupError(f"SLURM started {tasks} tasks (SLURM_NTASKS={tasks}, this is SLURM_PROCID="
                         f"{env['SLURM_PROCID']}), but without torchrun's variables (WORLD_SIZE, RANK, MASTER_ADDR) "
                         "they cannot form one group and would each do all the work: start one torchrun per node "
                         "(srun --ntasks-per-node 1 torchrun ...), or run a single task (srun --ntasks 1)")
    return 1, ""


def join_world(device: str) -> Any:
    """accelerate's PartialState for ``device`` ("auto", "cpu", "cuda", "cuda:N"), joined to the world the
    launcher started (:func:`launched_world`): with "auto" on a machine without CUDA, the launched processes
    join on the CPU (gloo) instead of each running alone. SetupError if the state's world is not the launched
    one (``--device cuda`` without CUDA, say), before anything is read or written."""
    from accelerate import PartialState

    launched, source = launched_world()
    cpu = device == "cpu" or (device == "auto" and launched > 1 and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if state.num_processes != launched:
        raise SetupError(f"the launcher started {launched} processes ({source}), but this one joined a group of "
                         f"{state.num_processes} on {state.device} (--device {device}): choose a --device every "
                         "process has (cpu joins them on the CPU), or launch a single process")
    return state


def single_process(what: str) -> None:
    """SetupError if the launcher started several processes: ``what`` runs as one (N copies would each do all
    the work and write the same outputs)."""
    launched, source = launched_world()
    if launched > 1:
        raise SetupError(f"{what} runs as one process, but the launcher started {launched} ({source}): run it "
                         "without torchrun or accelerate launch")


def make_accelerator(device: str, precision: str) -> tuple[Any, torch.device, torch.dtype | None]:
    """The Accelerator for ``device`` ("auto", "cpu", "cuda"; one process or a launched group, joined as
    :func:`join_world` says), its configured device and the autocast dtype of ``precision``
    (:func:`apply_precision`)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    state = join_world(device)
    # Precision and compilation are the entry point's to decide, whatever `accelerate config` says;
    # the RoPE and position tables are constants, so DDP need not broadcast buffers every step.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)
    cpu = device == "cpu" or (state.num_processes > 1 and state.device.type == "cpu")  # as join_world chose
    accelerator = Accelerator(cpu=cpu, mixed_precision="no", dynamo_backend="no", kwargs_handlers=[ddp])
    dev = configure_device(accelerator.device)
    return accelerator, dev, apply_precision(precision, dev)


def configure_device(device: torch.device) -> torch.device:
    """Give a bare 'cuda' its index (accelerate's single-process device) and make it current; a launched
    CPU rank's "cpu:0" becomes "cpu" (safetensors refuses an indexed CPU device). Precision is
    :func:`apply_precision`'s."""
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def resolve_device(spec: str) -> torch.device:
    """A single-process entry point's ``--device``: "auto" (CUDA if there is one), "cpu", "cuda", "cuda:N";
    configured by :func:`configure_device`."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    return configure_device(torch.device(spec))


def setup_logging(rank: int, log_file: str | None, *, stream: logging.Handler | None = None) -> None:
    """Rank 0 logs INFO to stderr (or ``stream``) and to ``log_file``; other ranks only warnings."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = stream or logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if rank == 0 and log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)


#: The lock file :func:`lock_folder` keeps in a folder while a process writes there.
LOCK_FILE = "urepa.lock"


class FolderBusy(SetupError):
    """Another process holds the lock of a folder; ``holder`` is what its lock file says (pid, host, what, since)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``FOLDER/urepa.lock``, held until :meth:`release` (or the end of a
    ``with`` block, or the process). The kernel drops the lock when the process ends in any way, SIGKILL and
    a crash included, so a dead holder never leaves the folder locked: the stale file stays, but it locks
    nothing, and the next writer takes it over. flock is local to one machine on most network file systems
    (NFSv4 emulates it with byte-range locks; Lustre needs the ``flock`` mount option)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_folder(folder: str, *, what: str) -> FolderLock:
    """Take the lock of ``folder`` (an existing folder) for ``what`` ("training run", ...), or raise
    :class:`FolderBusy` at once, naming the holder (pid, host, what, since) from the lock file. Generic: any
    entry point writing into a folder may use it (one lock file per folder, whatever writes there)."""
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SetupError(f"{folder} is not writable ({e.strerror or e}): fix its permissions or choose another "
                         "folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:  # being written this instant
            holder = {}
        os.close(fd)
        who = (f"{holder.get('what', 'another process')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
               f"since {holder.get('since', '?')})")
        raise FolderBusy(f"{folder} is in use by {who}: wait for it to finish or stop it; two writers would mix "
                         f"their outputs. The lock ({path}) goes with that process, even if it is killed",
                         holder) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return FolderLock(path, fd)


def broadcast_from_rank0(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; ``obj`` itself with one process)."""
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def claim_folder(out: str, *, marker: str, kind: str, legacy_keys: frozenset[str], lock: bool = False
                 ) -> FolderLock | None:
    """Make sure the output folder ``out`` is ours before anything is written into it: absent, empty, or
    holding our ``marker`` (or an older output whose config.json, a dict, holds ``legacy_keys``); then
    write the marker (``kind`` and a version), which also proves the folder writable. Anything else is
    refused with a sentence and left untouched. With ``lock``, the folder's :func:`lock_folder` is taken
    before the marker is written and returned (:class:`FolderBusy` if another process holds it); the caller
    keeps it while it writes there."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise SetupError(f"--out {out} is a file, not a folder: choose another --out")
    path = os.path.join(out, marker)
    if os.path.isdir(out) and not os.path.exists(path):
        entries = sorted(set(os.listdir(out)) - {LOCK_FILE})  # a concurrent claim's lock: still empty
        try:
            with open(os.path.join(out, "config.json")) as f:
                old = json.load(f)
            legacy = isinstance(old, dict) and legacy_keys <= set(old)
        except (OSError, ValueError):
            legacy = False
        if entries and not legacy:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise SetupError(f"--out {out} is not empty ({shown}) and holds no {marker}, so it is not a {kind} "
                             "of ours; nothing was written there: choose a new or empty folder")
    held = None
    try:
        os.makedirs(out, exist_ok=True)
        held = lock_folder(out, what=kind) if lock else None
        write_json(path, {"format": f"urepa-{kind.replace(' ', '-')}", "version": 1})
    except OSError as e:
        if held is not None:
            held.release()
        raise SetupError(f"--out {out} is not writable ({e.strerror or e}): fix its permissions or choose another "
                         "--out") from None
    return held


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
