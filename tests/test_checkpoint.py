"Checkpoints: safetensors round trip, strict keys, corrupt files, atomic writes."
import json

import pytest
import safetensors.torch
import torch

from jepa_lab import core
from jepa_lab.core import (CheckpointError, NonFiniteError, Run, check_finite, data_hash, load_checkpoint,
                           save_checkpoint, seed_everything, train_loop, weights_equal)


def make_model(hidden=8):
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))


def trained(seed=0):
    seed_everything(seed)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step(); sched.step(); opt.zero_grad()
    return model, opt, sched


def test_round_trip_restores_model_optimizer_scheduler_rng_and_metadata(tmp_path):
    model, opt, sched = trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, step=3, config={"hidden": 8},
                           data_hash=data_hash("abc"))
    expected_next = torch.rand(4)
    seed_everything(99)
    model2 = make_model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    info = load_checkpoint(path, model2, opt2, sched2)
    assert weights_equal(model.state_dict(), model2.state_dict())
    for i in opt.state_dict()["state"]:
        for k, v in opt.state_dict()["state"][i].items():
            assert torch.equal(v, opt2.state_dict()["state"][i][k])
    assert sched2.get_last_lr() == sched.get_last_lr() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(torch.rand(4), expected_next)
    assert (info.step, info.config, info.data_hash) == (3, {"hidden": 8}, data_hash("abc"))
    assert info.version == core.lab_version()


def test_file_is_plain_safetensors_with_metadata(tmp_path):
    model, opt, _ = trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, step=7)
    tensors = safetensors.torch.load_file(path)
    assert "model.0.weight" in tensors and any(k.startswith("optim.state.") for k in tensors)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"]["step"] == "7" and header["__metadata__"]["format"] == core.CHECKPOINT_FORMAT


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model, _, _ = trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model, step=1)
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, bigger)
    msg = str(e.value)
    assert "missing keys" in msg and "3.weight" in msg and "mis-shaped" in msg and "0.weight" in msg
    smaller = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*2\.weight"):
        load_checkpoint(path, smaller)
    before = [p.clone() for p in bigger.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, bigger.parameters()))  # a refused load changes nothing


def test_missing_optimizer_state_is_an_error(tmp_path):
    model, opt, _ = trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model, step=1)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, make_model(), torch.optim.AdamW(make_model().parameters()))


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty", "missing"])
def test_corrupt_or_missing_file_gives_clear_error(tmp_path, damage):
    model, _, _ = trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model, step=1)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 40])
    elif damage == "garbage_header":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, make_model())
    assert str(path) in str(e.value)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"0.weight": torch.zeros(8, 4)}, path)
    with pytest.raises(CheckpointError, match="not a jepa-lab checkpoint"):
        load_checkpoint(path, make_model())


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt, _ = trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, step=1)
    before = path.read_bytes()

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(core, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    assert load_checkpoint(path, make_model(), restore_rng=False).step == 1


def test_tied_weights_are_saved(tmp_path):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    path = save_checkpoint(tmp_path / "tied.safetensors", model, step=0)
    other = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False)})
    load_checkpoint(path, other, restore_rng=False)
    assert torch.equal(other["emb"].weight, emb.weight)


def test_nan_loss_stops_training_with_a_clear_error(tmp_path):
    with pytest.raises(NonFiniteError, match=r"loss=nan at step 4"):
        check_finite(4, {"loss": torch.tensor(float("nan")), "acc": 0.5})
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    run = Run(tmp_path / "run")

    def step_fn(step):
        return {"loss": torch.tensor(1.0 if step < 3 else float("inf"))}

    with pytest.raises(NonFiniteError, match="loss=inf at step 3"):
        train_loop(step_fn, model=model, optimizer=opt, steps=10, run=run, ckpt_every=2, log_every=1)
    saved = sorted(p.name for p in run.checkpoints.glob("*.safetensors"))
    assert saved == ["step-00000002.safetensors"]  # nothing written after the bad step
