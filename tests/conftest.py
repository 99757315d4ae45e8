import os
import sys
from pathlib import Path

import pytest

from jepa_lab.core import torch_threads

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture
def cli_env(tmp_path):
    "Environment for `jepa-lab` subprocesses: quiet, headless, runs under tmp_path."
    env = {k: v for k, v in os.environ.items() if not k.startswith("JEPA_LAB_")}
    env.update(TQDM_DISABLE="1", MPLBACKEND="Agg", JEPA_LAB_RUNS_PATH=str(tmp_path / "runs"),
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    return env


@pytest.fixture
def jepa_lab():
    "Path of the installed `jepa-lab` console script."
    path = BIN / "jepa-lab"
    assert path.exists(), f"{path} missing: install the project (make setup)"
    return str(path)


@pytest.fixture
def one_thread():
    "Small-op loops stall when two OpenMP threads share two busy cores; one torch thread keeps them fast and steady."
    with torch_threads(1):
        yield
