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


@pytest.fixture(scope="session")
def la_root():
    if not (LA_ROOT / "train.list").exists():
        pytest.skip(f"real LA data not found at {LA_ROOT} (set CERS_LA_ROOT)")
    return LA_ROOT


@pytest.fixture(scope="session")
def brisc_csv():
    path = FIXTURES / "brisc_cot_sample.csv"
    if not path.exists():
        pytest.skip(f"CoT fixture not found at {path}")
    return path
