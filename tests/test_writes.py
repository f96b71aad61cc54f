"""config.py's writes: atomic, leaving no temp file, OS errors named in one line, the probe before the data
are read, and the lock that keeps one process per folder (taken over from a process that died holding it)."""
import errno
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import config


def dead_pid():
    """The PID of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def leftovers(folder):
    """The temp files left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_replacing_writes_whole_files_or_nothing(tmp_path):
    path = tmp_path / "state.bin"
    config.write_bytes(path, b"old")
    with pytest.raises(KeyboardInterrupt):
        with config.replacing(path) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt                    # Ctrl-C in the middle of a write
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []
    config.write_text(path, "new")
    assert path.read_text() == "new" and leftovers(tmp_path) == []
    names = {config.temp_path(path).name for _ in range(20)}
    assert len(names) == 20 and all(f".{os.getpid()}." in n for n in names)   # never shared, this PID in each


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"),
                                         (errno.EROFS, "the file system is read-only"),
                                         (errno.EFBIG, "file too large"), (errno.EIO, "input/output error")])
def test_os_errors_become_words(tmp_path, code, words):
    with pytest.raises(config.WriteError, match=re.escape(f"{tmp_path / 'x'}: cannot write it: {words}")):
        with config.writing(tmp_path / "x"):
            raise OSError(code, os.strerror(code))


def test_a_folder_under_a_file_or_read_only_is_refused(tmp_path):
    (tmp_path / "notes").write_text("a file")
    named = re.escape(f"{tmp_path / 'notes'} is a file, not a folder")
    for folder in (tmp_path / "notes", tmp_path / "notes" / "run" / "deeper"):
        with pytest.raises(config.WriteError, match=named):
            config.check_writable(folder)
    assert (tmp_path / "notes").read_text() == "a file"
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() != 0:                               # root writes into read-only folders
        with pytest.raises(config.WriteError, match="permission denied"):
            config.check_writable(tmp_path / "ro" / "run")


def test_check_writable_leaves_nothing_and_clears_dead_processes_temps(tmp_path):
    folder = tmp_path / "a" / "b"
    config.check_writable(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []
    dead, mine = folder / f".x.pt.{dead_pid()}.0123abcd.tmp", config.temp_path(folder / "x.pt")
    other = folder / ".notes.tmp"                       # not a temp of this project's making
    for p in (dead, mine, other):
        p.write_bytes(b"")
    config.check_writable(folder)
    assert not dead.exists() and mine.exists() and other.exists()


@pytest.mark.parametrize("name", ["run", "runs/{exp}-{seed}", "50%_{0}_%s"])
def test_a_held_lock_refuses_a_second_holder_naming_the_pid_and_the_path_verbatim(tmp_path, name):
    """Braces and % in a folder name are never formatting fields: the message holds the path as it is."""
    out = tmp_path / name
    with config.Lock(out / "run.lock", busy=f"{out}: busy, PID {{pid}}"):
        assert (out / "run.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(config.WriteError) as e:
            with config.Lock(out / "run.lock", busy=f"{out}: busy, PID {{pid}}"):
                pass
    assert str(e.value) == f"{out}: busy, PID {os.getpid()}"
    assert not (tmp_path / name.split("/")[0]).exists()        # the folders made for the lock are removed


def test_a_lock_left_by_a_dead_process_is_taken_over_and_a_waiting_one_gets_it(tmp_path, capsys):
    lock, pid, order = tmp_path / "run.lock", dead_pid(), []
    lock.write_text(f"{pid}\n")
    with config.Lock(lock, busy="busy {pid}"):
        assert lock.read_text().strip() == str(os.getpid())
    assert f"held by process {pid}, which ended without releasing it; taken over" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    def second():
        with config.Lock(lock):                          # busy=None: wait
            order.append("second")

    with config.Lock(lock):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        order.append("first done")
    waiter.join(10)
    assert order == ["first done", "second"] and not lock.exists()
