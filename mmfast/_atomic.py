"""Atomic saves: a file is either its old contents or its complete new contents, never half of one.

Every save in mmfast writes the new contents beside the target (same folder, so same filesystem),
fsyncs them, and `os.replace`s them over the target; the folder is fsynced so that the rename itself
survives a power cut. What a process killed mid-save leaves behind:

- `atomic_write(path, data_or_writer)` (for writers that take a file object) writes into an unnamed
  inode (Linux `O_TMPFILE`) that gets a name only once it is complete: a killed process leaves
  nothing at all (the kernel frees the inode). Elsewhere it falls back to a named temporary file.
- `atomic_path(path)` (for writers that only take a path: torch.onnx.export, ORT, PIL by extension)
  yields a hidden temporary path `.<name>.tmp-<pid>-<hex><suffix>`, and `staging_dir` a hidden
  folder named the same way, for outputs made of several files. A killed process leaves that entry;
  the next save into the same folder removes entries of processes that no longer exist (`sweep`).

Folders are replaced with `replace_dir` (an atomic swap with renameat2(RENAME_EXCHANGE) where the
kernel has it), a graph with its external-data file with `replace_with_sidecar`.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

# .<name>.tmp-<pid>-<host: 4 hex><random: 6 hex>[<suffix>]: hidden, names its target and the process
# that writes it. The host tag keeps a sweep from removing the files of a live process on another
# machine or container sharing the folder (its pid means nothing here).
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{4})[0-9a-f]{6}(?:\.[^.]*)?$")
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
_UNNAMED = hasattr(os, "O_TMPFILE")  # tests switch it off to exercise the named fallback


def temp_name(path: Path, suffix: str = "") -> Path:
    """A fresh hidden name beside `path` that `sweep` recognises (with `suffix`, e.g. ".onnx")."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{_HOST}{secrets.token_hex(3)}{suffix}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep(folder) -> list[Path]:
    """Remove the temporary files / folders that processes which no longer run left in `folder`
    (killed mid-save); returns what was removed. Entries of live processes, or of other hosts, stay."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TMP.match(e.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        p = Path(e.path)
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _target(path) -> Path:
    path = Path(os.fspath(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {str(path)!r}: it is a folder; pass a file path "
                                "inside it", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"cannot save to {str(path)!r}: the folder {str(path.parent)!r} "
                                "does not exist", str(path))
    return path


def fsync_path(path) -> None:
    """Flush a file's (or a folder's) contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a folder; the data itself was synced
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _write_to(f, data_or_writer) -> None:
    if callable(data_or_writer):
        data_or_writer(f)
    elif isinstance(data_or_writer, str):
        f.write(data_or_writer.encode("utf-8"))
    else:
        f.write(data_or_writer)


def atomic_write(path, data_or_writer) -> Path:
    """Replace `path` with new contents, atomically.

    Parameters
    ----------
    path : the file to write (its folder must exist; it must not be a folder).
    data_or_writer : bytes / a buffer, a str (written as UTF-8), or a callable `writer(f)` that writes
        into the binary file object `f` (e.g. ``lambda f: image.save(f, format="PNG")``).

    If the writer raises, `path` keeps its old contents and nothing is left behind.

    Example
    -------
    >>> atomic_write("choice.json", json.dumps(choice))
    """
    path = _target(path)
    fd = None
    if _UNNAMED:
        try:
            fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o666)
        except OSError:  # the filesystem has no O_TMPFILE (e.g. some network filesystems)
            fd = None
    if fd is None:
        with atomic_path(path, suffix="") as tmp, open(tmp, "wb") as f:
            _write_to(f, data_or_writer)
        return path
    try:
        with io.FileIO(fd, "wb", closefd=False) as raw, io.BufferedWriter(raw) as f:
            _write_to(f, data_or_writer)
        os.fsync(fd)
        tmp = temp_name(path)
        try:  # give the complete inode a name (the open(2) man page's recipe), then rename it over path
            os.link(f"/proc/self/fd/{fd}", tmp, follow_symlinks=True)
        except OSError:  # no /proc: copy it into a named temporary file instead
            with atomic_path(path, suffix="") as named, open(named, "wb") as out:
                os.lseek(fd, 0, os.SEEK_SET)
                with io.FileIO(fd, "rb", closefd=False) as src:
                    shutil.copyfileobj(src, out, 1 << 24)
            return path
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(path.parent)
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def atomic_path(path, *, suffix: str | None = None):
    """Yield a temporary path beside `path` for a writer that only takes a path; when the block ends
    without an exception the file written there replaces `path` atomically, otherwise it is removed.

    `suffix` ends the temporary name (default: `path`'s own suffix, for writers that pick a format by
    extension). A process killed inside the block leaves the hidden temporary file, which the next
    save into the folder removes (`sweep`).

    Example
    -------
    >>> with atomic_path("model.onnx") as tmp:
    ...     torch.onnx.export(module, args, tmp)
    """
    path = _target(path)
    sweep(path.parent)
    tmp = temp_name(path, path.suffix if suffix is None else suffix)
    try:
        yield str(tmp)
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, f"nothing was written to the temporary file for {path}", str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(parent, name: str):
    """Yield a new hidden folder in `parent` (named for `name`) to build a multi-file output in; move
    the results out with `replace_dir` / `replace_with_sidecar`; whatever is left is removed on exit."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent)
    d = temp_name(parent / name)
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staged, final) -> None:
    """Move the complete folder `staged` to `final` (same filesystem), replacing a folder there:
    an atomic swap where the kernel has one; else the old folder is renamed aside first (a kill
    between the two renames leaves no `final`, but the old one is kept under a hidden name)."""
    staged, final = Path(staged), Path(final)
    for root, _, files in os.walk(staged):
        for f in files:
            fsync_path(os.path.join(root, f))
    if not final.exists():
        os.rename(staged, final)
    elif _exchange(staged, final):
        shutil.rmtree(staged)  # now the old folder
    else:
        old = temp_name(final)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old)
    fsync_path(final.parent)


def replace_with_sidecar(staged, final, sidecar: str = ".data") -> None:
    """Move `staged` (e.g. an ONNX graph) and its `<staged><sidecar>` file, if any (the external
    weights it names by `<final name><sidecar>`), over `final`. The graph moves last: a graph never
    names weights that are not complete; when the weights change, the old graph is removed first, so
    a kill in between leaves no graph (a cache rebuilds it) rather than old graph + new weights."""
    staged, final = Path(staged), Path(final)
    data, final_data = Path(str(staged) + sidecar), Path(str(final) + sidecar)
    fsync_path(staged)
    if data.exists():
        fsync_path(data)
        final.unlink(missing_ok=True)
        os.replace(data, final_data)
        os.replace(staged, final)
    else:
        os.replace(staged, final)
        final_data.unlink(missing_ok=True)  # the new graph holds its weights; the old file is garbage
    fsync_path(final.parent)
