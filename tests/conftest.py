"""Shared test set-up: CPU only, deterministic, one thread, the project's own modules first on sys.path."""
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)   # as in the children: bit-identical sums need it, and a busy CPU runs it faster

# the real LA benchmark, when present beside the project (CI has it); tests that need it skip otherwise
SHARED = Path(os.environ.get("CERS_SHARED", ROOT.parent / "shared"))
LA_ROOT = Path(os.environ.get("CERS_LA_ROOT", SHARED / "LA"))
FIXTURES = SHARED / "fixtures"


def missing(what):
    """Skip on a developer machine without the shared files; fail in CI, where they must be present."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must have the shared data beside the project: CERS_SHARED, CERS_LA_ROOT)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def la_root():
    if not (LA_ROOT / "train.list").exists():
        missing(f"real LA data not found at {LA_ROOT} (set CERS_LA_ROOT)")
    return LA_ROOT


@pytest.fixture(scope="session")
def brisc_csv():
    path = FIXTURES / "brisc_cot_sample.csv"
    if not path.exists():
        missing(f"CoT fixture not found at {path}")
    return path


def write_la(root, n_train=6, n_test=2, shape=(40, 36, 24), seed=0):
    """A tiny LA-layout dataset of random blobs, sizes varying per case (odd sizes on purpose)."""
    import h5py
    import numpy as np
    from data import CASE_DIR, CASE_FILE
    rng = np.random.default_rng(seed)
    ids = [f"CASE{i:02d}" for i in range(n_train + n_test)]
    for i, case_id in enumerate(ids):
        size = (shape[0] + i % 3, shape[1] + (i * 5) % 7, shape[2])
        grid = np.stack(np.meshgrid(*[np.arange(s) - s / 2 for s in size], indexing="ij"))
        label = ((grid ** 2).sum(0) < (min(size) / 3) ** 2).astype(np.uint8)
        image = (label * 2.0 + rng.normal(0, 0.5, size)).astype(np.float32)
        folder = Path(root) / CASE_DIR / case_id
        folder.mkdir(parents=True)
        with h5py.File(folder / CASE_FILE, "w") as f:
            f["image"], f["label"] = image, label
    Path(root, "train.list").write_text("\n".join(ids[:n_train]) + "\n")
    Path(root, "test.list").write_text("\n".join(ids[n_train:]) + "\n")
    return Path(root)


@pytest.fixture
def tiny_la(tmp_path):
    return write_la(tmp_path / "LA")


def spawn(args, cwd, file_limit=None, memory_limit=None):
    """A child Python running args (a project script and its arguments, or "-c" and code) in cwd on one
    thread, stdout and stderr to cwd/stdout.txt and stderr.txt (see finish). file_limit: the most bytes it may
    write to a file (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG, as on a full disk). memory_limit: the most bytes of
    data it may allocate (RLIMIT_DATA: an allocation past it fails, as when memory runs out)."""
    def limit():
        if file_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(Path(cwd, "stdout.txt"), "w") as out, open(Path(cwd, "stderr.txt"), "w") as err:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, stdout=out, stderr=err,
                                preexec_fn=limit)


def wait_for(child, cwd, ready, timeout=120):
    """Wait until ready() is true while the child runs: a text in its stdout.txt, a file it writes."""
    end = time.time() + timeout
    while not ready():
        assert child.poll() is None, Path(cwd, "stderr.txt").read_text()[-3000:]
        assert time.time() < end, f"the child was not ready in {timeout} s"
        time.sleep(0.1)


def finish(child, cwd, timeout=120):
    """The child's exit status and the last line of its stderr, with no traceback before it."""
    status = child.wait(timeout)
    err = Path(cwd, "stderr.txt").read_text()
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    return status, lines[-1] if lines else ""
