"""Every file the project writes goes through here: checkpoints, configs, logs, figures, test outputs, the
phantom and the volume cache. A crash, a full disk or a second process never leaves a half-written file under
its final name, and an OS error becomes one line that names the file and the cause in words (WriteError).

    with replacing(path) as tmp:         # write tmp; it replaces path when the block succeeds, else vanishes
        torch.save(state, tmp)
    write_text(path, text), write_bytes(path, data), save_figure(fig, path), make_folder(path)
    check_writable(folder)               # before the data are read: the folder can be created and written
    with Lock(folder / "run.lock", busy="... {pid} ..."):   # one process at a time
        ...

Temp files are named .<name>.<pid>.<random>.tmp beside their target, so two processes never share one and
those of a process that was killed (kill -9, a power cut) are recognised and removed (remove_stale_temps).
"""
import contextlib
import errno
import fcntl
import itertools
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

from config import CersError

CAUSES = {  # errno: the cause in words, with what to do
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EFBIG: "file too large for a file-size limit (ulimit -f) or the file system; raise it or write "
                 "elsewhere",
    errno.EACCES: "permission denied; write elsewhere or make the folder writable",
    errno.EPERM: "operation not permitted; write elsewhere or make the folder writable",
    errno.EROFS: "the file system is read-only; write elsewhere",
}
TEMP = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")


class WriteError(CersError):
    """A file or folder that cannot be written; the message names it and says why in words."""


def cause(path, e):
    """Why writing `path` failed, in words, from the OSError e."""
    if e.errno in (errno.ENOTDIR, errno.EEXIST):       # mkdir through or onto a file
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file, not a folder; remove it or write elsewhere"
    return CAUSES.get(e.errno) or (e.strerror or str(e)).rstrip(".").lower()


@contextlib.contextmanager
def writing(path):
    """OS errors in the block become a WriteError naming `path`."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"{path}: cannot write it: {cause(Path(path), e)}") from e


def temp_path(path):
    """A temp name beside `path` that no other process uses: .<name>.<pid>.<random>.tmp."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def replacing(path):
    """Yield a temp path beside `path` to write; when the block ends without error it replaces `path` in one
    step (os.replace), on any error or interruption it is removed and `path` stays as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes(path, data):
    """Write `data` to `path` atomically, flushed to the disk before it takes the name (a checkpoint survives
    a power cut as the old or the new file)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path, text):
    write_bytes(path, text.encode())


def save_figure(fig, path, **kwargs):
    """fig.savefig(path) atomically, the format from the file's suffix."""
    with replacing(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs)


@contextlib.contextmanager
def appending(path):
    """The text file at `path` opened for appending (a log); OS errors become a WriteError naming it."""
    with writing(path), open(path, "a", newline="", encoding="utf-8") as f:
        yield f


def make_folder(path):
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                            # another user's process
        return True
    return True


def remove_stale_temps(folder):
    """Remove the temp files and folders (temp_path names) left in `folder` by processes no longer running."""
    for p in Path(folder).glob(".*.tmp"):
        m = TEMP.fullmatch(p.name)
        if m and int(m[1]) != os.getpid() and not alive(int(m[1])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def check_writable(folder):
    """Create `folder` when missing and write and remove a probe file there, before any data are read, so a
    folder that cannot take files is refused at once (WriteError), not after the work. Temp files left there
    by processes no longer running are removed."""
    folder = make_folder(folder)
    probe = temp_path(folder / "probe")
    with writing(folder):
        try:
            probe.write_bytes(b"probe")
        finally:
            probe.unlink(missing_ok=True)
    remove_stale_temps(folder)
    return folder


class Lock:
    """An exclusive lock (fcntl.flock) on the file `path`, which holds the PID of the process holding it.

    The kernel drops the lock when its process ends, however it ends, so the file of a killed process is
    simply taken over. `busy`: the refusal when another process holds the lock, formatted with {pid} (a
    WriteError); None waits for the lock instead. The lock file is removed on release, and so are the folders
    made for it that are still empty (a refused or stopped run leaves no trace)."""

    def __init__(self, path, busy=None):
        self.path, self.busy, self.fd = Path(path), busy, None

    def __enter__(self):
        folder = self.path.parent
        self.made = list(itertools.takewhile(lambda p: not p.exists(), [folder, *folder.parents]))
        make_folder(folder)
        with writing(self.path):
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    holder = self.acquire(fd)
                except BaseException:
                    os.close(fd)
                    raise
                if same_file(self.path, fd):
                    break
                os.close(fd)                           # its holder removed the file as this one opened it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        if holder and holder != os.getpid():
            print(f"note: {self.path} was held by process {holder}, which ended without releasing it; "
                  "taken over", file=sys.stderr)
        remove_stale_temps(folder)
        return self

    def acquire(self, fd):
        """Lock the open file fd (waiting, or refusing with `busy`); returns the PID written in it before."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder_pid(fd)
            if self.busy is not None:
                raise WriteError(self.busy.format(pid=pid or "unknown")) from None
            print(f"waiting for process {pid or '(unknown)'}, which holds {self.path}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        return holder_pid(fd)

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.path.unlink()                         # while locked: a waiting process then sees a new file
        os.close(self.fd)
        for folder in self.made:                       # the folders made for the lock, while they are empty
            try:
                folder.rmdir()
            except OSError:
                break


def holder_pid(fd):
    """The PID written in an open lock file, or None."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def same_file(path, fd):
    """Whether the open file fd is still the file at `path`."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
