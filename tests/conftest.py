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


def _small_lab(n_walks: int, steps: int, test_walks: int = 0, seed: int = 0, test_seed: int = 999):
    """A tiny lab world in latent space (lesson 08's recipe): `n_walks` random walks, their situation bank on the seeded
    random-init ViT and latents (n, T+1, D); `test_walks` walks of other worlds and their latents (or None)."""
    from types import SimpleNamespace

    import torch
    from jepa_lab.dreams import SituationBank, frame_encoder, lab_walks
    with torch.no_grad():
        encoder, name = frame_encoder(Path("no-checkpoint-needed"), seed=0, source="random")
        train = lab_walks(n_walks, steps, seed=seed)
        H = train.images.shape[2]
        bank = SituationBank(encoder, train.images.reshape(-1, H, H, 3), [s for row in train.scenes for s in row])
        latents = bank.latents[bank.situation_of].view(n_walks, steps + 1, -1)
        test = lab_walks(test_walks, steps, seed=test_seed) if test_walks else None
        test_latents = bank.encode(test.images.reshape(-1, H, H, 3)).view(test_walks, steps + 1, -1) if test else None
    return SimpleNamespace(bank=bank, walks=train, latents=latents, test_walks=test, test_latents=test_latents, encoder_name=name)


@pytest.fixture(scope="session")
def small_lab():
    "The factory `_small_lab(n_walks, steps, test_walks=0, seed=0, test_seed=999)` for the dreaming lessons' tests."
    return _small_lab


def _tiny_vl(n_train: int, n_val: int, n_test: int, vocab: int, vit_dim: int, seed: int = 0):
    """Lesson 13's data at a tiny size: splits of lab frames, a BPE of `vocab` tokens trained on the train texts, a random
    tiny ViT as X-encoder (its visual tokens), and 13a's `VLData`. Returns (splits, data, bpe)."""
    import torch
    from jepa_lab.encoders import ViT, ViTConfig
    from jepa_lab.tokenize import ByteBPE
    from jepa_lab.vl_data import vl_splits
    from jepa_lab.vl_jepa import split_items, visual_tokens, vl_data
    torch.manual_seed(seed)
    splits = vl_splits(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    items = split_items(splits)
    bpe = ByteBPE.train(items["train"].texts, vocab)
    vit = ViT(ViTConfig(image_size=64, patch_size=8, dim=vit_dim, depth=1, heads=2)).eval()
    data = vl_data({k: visual_tokens(vit, v.frames) for k, v in splits.items()}, items, bpe)
    return splits, data, bpe


@pytest.fixture(scope="session")
def tiny_vl():
    "The factory `_tiny_vl(n_train, n_val, n_test, vocab, vit_dim, seed=0)` for lesson 13's tests."
    return _tiny_vl
