"""Shared test set-up: CPU only, deterministic, and the project's own modules first on sys.path."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the real LA benchmark, when present beside the project (CI has it); tests that need it skip otherwise
SHARED = Path(os.environ.get("CERS_SHARED", ROOT.parent / "shared"))
LA_ROOT = Path(os.environ.get("CERS_LA_ROOT", SHARED / "LA"))
FIXTURES = SHARED / "fixtures"


def missing(what):
    """Skip on a developer machine without the shared files; fail in CI, where they must be present."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must have ../shared beside the project)")
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
