"""Crash-safe files: atomic writes, the work directory's lock and its configuration check.

Every file tyr writes for later use goes through :func:`atomic_write` (temporary sibling, fsync,
rename), so a crash leaves either the old file or the new one, never a torn one. A work
directory records the options it was started with; resuming it with other options is refused,
naming the fields that differ, and a lock keeps a second run out while the first holds it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from tyr.errors import UserError

__all__ = [
    "atomic_writer",
    "atomic_write",
    "atomic_json",
    "fsync_tree",
    "locked",
    "check_options",
    "pid_alive",
    "prepare_out",
    "finish_out",
]

T = TypeVar("T")

OPTIONS = "options.json"
LOCK = "lock"


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the block ends (temporary sibling, fsync,
    rename); an exception leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling, fsync and rename."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_json(path: Path, data: Any, indent: int | None = 1) -> None:
    atomic_write(path, (json.dumps(data, indent=indent) + "\n").encode())


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (before it is renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `workdir` (released by the kernel if the process dies)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(
                f"work directory {workdir} is in use by another tyr prune (pid {holder})",
                "wait for it to finish, or pass another --workdir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def check_options(workdir: Path, options: dict[str, Any], record: bool) -> None:
    """Refuse to resume a work directory started with other options; with `record`, write
    `options` into a new one (once its inputs have been checked, so a run that fails on bad
    input does not claim the directory)."""
    path = workdir / OPTIONS
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if isinstance(before, dict):
            changed = [k for k in sorted(set(before) | set(options)) if before.get(k) != options.get(k)]
            if changed:
                what = ", ".join(f"{k}: {_show(before.get(k))} → {_show(options.get(k))}" for k in changed)
                raise UserError(
                    f"work directory {workdir} was started with other options ({what})",
                    "rerun with the original options to resume, or pass another --workdir",
                )
            return
    if record:
        atomic_json(path, options)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def prepare_out(
    out_arg: str, overwrite: bool, finished: Callable[[Path], T | None]
) -> tuple[Path, Path, T | None]:
    """Validate an output directory before any work: returns (out, its temporary sibling to
    write into, None), or (out, out, what `finished(out)` found) when `out` already holds this
    run's result. A non-empty `out` that does not is refused unless `overwrite`."""
    out = Path(out_arg).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_arg} is a file", "give a directory path")
    if out.is_dir() and any(out.iterdir()):
        done = None if overwrite else finished(out)
        if done is not None:
            return out, out, done
        if not overwrite:
            raise UserError(
                f"--out {out_arg} is not empty and does not hold this configuration's result",
                "pass --overwrite or choose another directory",
            )
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise UserError(
            f"cannot write --out {out_arg} ({exc.strerror})", "choose a writable directory"
        ) from exc
    return out, tmp, None


def _remove_stale(out: Path) -> None:
    """Remove the temporary siblings of `out` that a killed run left behind."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def finish_out(tmp: Path, out: Path) -> None:
    """Move a fully written temporary sibling into place as `out` (replacing an old one)."""
    fsync_tree(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
