"Saving and loading a trained text JEPA with its BPE and manifest (lesson 06b)."
import json

import pytest
import torch

from jepa_lab.encoders import TextEncoderConfig
from jepa_lab.jepa import JEPAConfig, TextJEPA
from jepa_lab.jepa_eval import load_text_jepa, save_text_jepa
from jepa_lab.tokenize import ByteBPE


@pytest.fixture()
def saved(tmp_path):
    bpe = ByteBPE.train(["hello there", "general kenobi", "you are a bold one"] * 5, 300)
    torch.manual_seed(0)
    model = TextJEPA(TextEncoderConfig(vocab_size=bpe.vocab_size, dim=16, depth=1, heads=2, max_len=8),
                     JEPAConfig(predictor_dim=8, predictor_depth=1, predictor_heads=2, ema_start=0.99), span_weight=0.5)
    save_text_jepa(tmp_path, model, bpe, seed=3, recipe={"steps": 7}, data={"hash": "abc"}, results={"mrr": 0.2})
    return tmp_path, model, bpe


def test_round_trip_is_exact(saved):
    folder, model, bpe = saved
    again, again_bpe, manifest = load_text_jepa(folder)
    assert again.config == model.config and again.span_weight == 0.5 and manifest["seed"] == 3
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert again_bpe.encode("bold one") == bpe.encode("bold one")


def test_changed_weights_or_tokenizer_are_refused(saved):
    folder, _, _ = saved
    (folder / "text_jepa-bpe.json").write_text((folder / "text_jepa-bpe.json").read_text() + " ")
    with pytest.raises(ValueError, match="tokenizer_sha256"): load_text_jepa(folder)


def test_missing_or_foreign_manifest_is_named(saved):
    folder, _, _ = saved
    manifest = json.loads((folder / "text_jepa.json").read_text())
    (folder / "text_jepa.json").write_text(json.dumps({**manifest, "format": "jepa-lab-image-jepa/1"}))
    with pytest.raises(ValueError, match="not a text-JEPA manifest"): load_text_jepa(folder)
    (folder / "text_jepa.json").unlink()
    with pytest.raises(ValueError, match="no manifest"): load_text_jepa(folder)
    with pytest.raises(FileNotFoundError, match="experiments/text_jepa"): load_text_jepa(folder / "nowhere")
