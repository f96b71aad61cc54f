"""Every file the project writes goes through here: written to a temp file beside it, then renamed, so none
is ever half written under its name (temp names .<name>.<pid>.<random>.tmp, a dead process's removed); an OS
error becomes one line naming the file and the cause in words (WriteError); Lock keeps one process a folder.
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
import tempfile
from pathlib import Path

from config import CersError

CAUSES = {  # errno: the cause in words, with what to do
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EFBIG: "file too large for a file-size limit (ulimit -f) or the file system; write elsewhere",
    errno.EACCES: "permission denied; write elsewhere or make the folder writable",
    errno.EPERM: "operation not permitted; write elsewhere or make the folder writable",
    errno.EROFS: "the file system is read-only; write elsewhere",
}
TEMP = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")  # temp_path's names; group 1 is the writer's PID


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
    """Yield a temp path beside `path` to write; it replaces `path` in one step if the block succeeds."""
    path, tmp = Path(path), temp_path(path)
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:                                           # on any error or interruption `path` stays as it was
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes(path, data):
    """Write `data` to `path` atomically, on the disk before it takes the name (survives a power cut)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path, text):
    """Write `text` to `path` atomically (write_bytes)."""
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
    """Create the folder `path` with its parents (WriteError if it cannot be) and return it."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def alive(pid):
    """Whether process `pid` still runs (another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_temps(folder):
    """Remove the temp files and folders left in `folder` by processes no longer running."""
    for p in Path(folder).glob(".*.tmp"):
        m = TEMP.fullmatch(p.name)
        if m and int(m[1]) != os.getpid() and not alive(int(m[1])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def check_writable(folder):
    """Create `folder`, write a probe there before any data are read (fail at once), clear dead temps."""
    folder = make_folder(folder)
    with writing(folder), tempfile.TemporaryFile(dir=folder) as probe:    # nameless: nothing is left behind
        probe.write(b"probe")
    remove_stale_temps(folder)
    return folder


class Lock:
    """An exclusive flock on the file `path`, which holds the holder's PID: one process at a time. The kernel
    drops it when its process dies (a stale lock is taken over); release removes the file and the folders
    made for it. While another process holds it: wait (busy None), or refuse with WriteError(busy), "{pid}" in
    the text replaced by the holder's PID (never str.format: paths stay as they are)."""

    def __init__(self, path, busy=None):
        self.path, self.busy = Path(path), busy

    def __enter__(self):
        path, folder = self.path, self.path.parent
        self.made = list(itertools.takewhile(lambda p: not p.exists(), [folder, *folder.parents]))
        make_folder(folder)
        with writing(path):
            while True:                                # until the file locked is still the one at `path`
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    flock(self.fd, path, self.busy)
                except BaseException:
                    os.close(self.fd)
                    raise
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                        break
                os.close(self.fd)                      # its holder removed the file as this one opened it
            holder = holder_pid(self.fd)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        if holder and holder != os.getpid():
            print(f"note: {path} was held by process {holder}, which ended without releasing it; taken over",
                  file=sys.stderr)
        remove_stale_temps(folder)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.path.unlink()                         # while locked: a waiting process then sees a new file
        os.close(self.fd)
        with contextlib.suppress(OSError):             # up to the first folder that is not empty
            for folder in self.made:
                folder.rmdir()


def flock(fd, path, busy):
    """Lock the open lock file fd: see Lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = holder_pid(fd) or "unknown"
        if busy is not None:
            raise WriteError(busy.replace("{pid}", str(pid))) from None
        print(f"waiting for process {pid}, which holds {path}", file=sys.stderr)
        fcntl.flock(fd, fcntl.LOCK_EX)


def holder_pid(fd):
    """The PID written in an open lock file, or None."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None

