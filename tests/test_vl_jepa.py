"VL-JEPA (13a): the InfoNCE over distinct targets, the predictor's inputs, phase 1 learning from the image, the token baseline, saving."
import pytest
import torch

from jepa_lab.core import Run
from jepa_lab.encoders import TextEncoder, TextEncoderConfig
from jepa_lab.jepa import JEPAConfig, TextJEPA
from jepa_lab.jepa_eval import save_text_jepa
from jepa_lab.vl_data import CAPTION_QUERY
from jepa_lab.vl_jepa import (VLConfig, VLError, VLJEPA, VLRecipe, VLTokenModel, VLTrainConfig, YEncoder, distinct_info_nce,
                              evaluate_embedding_model, evaluate_token_model, left_padded_ids, load_vl_jepa, pool_grid,
                              save_vl_jepa, train_vl)


@pytest.fixture(scope="module")
def tiny(tiny_vl):
    "Small splits, a random tiny ViT as X-encoder, a random tiny text encoder with a BPE trained on the texts as Y-encoder."
    return tiny_vl(40, 6, 12, 320, 32)


def y_encoder(bpe, seed=0):
    torch.manual_seed(seed)
    return YEncoder(TextEncoder(TextEncoderConfig(vocab_size=bpe.vocab_size, dim=32, depth=1, heads=2, max_len=96)), bpe)


def config(bpe, **kw):
    return VLConfig(**{"x_dim": 32, "y_dim": 32, "q_dim": 32, "vocab_size": bpe.vocab_size, "dim": 32, "depth": 1, "heads": 2,
                       "d_state": 8, "chunk": 16, **kw})


def test_distinct_info_nce_treats_equal_targets_as_one():
    t = torch.randn(3, 8)
    index = torch.tensor([0, 1, 1, 2])
    aligned = distinct_info_nce(t[index] * 10, t, index)          # rows 1 and 2 share a target: not each other's negatives
    shuffled = distinct_info_nce(t[index.flip(0)] * 10, t, index)
    assert aligned < 0.05 and shuffled > 1.0
    with pytest.raises(VLError, match="non-finite"):
        distinct_info_nce(torch.full((4, 8), float("nan")), t, index)


def test_pool_grid_averages_neighbours():
    tokens = torch.arange(16.).view(1, 16, 1)                 # a 4 × 4 grid of values 0..15
    assert pool_grid(tokens, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(VLError, match="square grid"):
        pool_grid(torch.zeros(1, 12, 4), 2)


def test_queries_are_left_padded_and_padding_ids_are_ignored(tiny):
    _, _, bpe = tiny
    ids, pad = left_padded_ids(bpe, ["where is the agent?", "red"])
    assert not pad[:, -1].any() and pad[1, 0] and not pad[0, 0]
    model = VLJEPA(config(bpe)).eval()
    x = torch.randn(2, 64, 32)
    a = model(x, ids, pad).pred
    b = model(x, ids.masked_fill(pad, 7), pad).pred
    assert torch.allclose(a, b, atol=1e-6)
    keep = int((~pad[1]).sum())                                           # the short question alone, without padding
    alone = model(x[1:], ids[1:, -keep:], pad[1:, -keep:])
    assert torch.allclose(a[1:], alone.pred, atol=1e-5)                   # a prediction does not depend on its batch-mates
    with pytest.raises(VLError, match="left-padded"):
        model(x, ids.flip(1), pad.flip(1))
    with pytest.raises(VLError, match="visual tokens"):
        model(torch.randn(2, 64, 5), ids, pad)


def test_y_encoder_rejects_texts_over_its_length(tiny):
    _, _, bpe = tiny
    with pytest.raises(VLError, match="longer than"):
        y_encoder(bpe)(["red " * 200])


def test_phase1_learns_from_the_image(tiny, tmp_path):
    "A seeded tiny run: image→text retrieval with the image clearly above the same model without it (which is at chance)."
    _, data, bpe = tiny
    cfg = VLTrainConfig(steps=150, batch_size=32, lr=2e-3, warmup=10, caption_share=0.5)
    scores = {}
    for use_image in (True, False):
        torch.manual_seed(0)
        y = y_encoder(bpe)
        model = train_vl(VLJEPA(config(bpe, use_image=use_image)), data, cfg, Run(tmp_path / str(use_image)), y_enc=y)
        scores[use_image] = evaluate_embedding_model(model, y, data)
    n_captions = len(set(data.items["test"].texts[i] for i in data.items["test"].target[data.items["test"].kind == 0].tolist()))
    assert scores[False]["i2t R@5"] < 10 / n_captions                       # the text-only model cannot tell frames apart
    assert scores[True]["i2t R@5"] > scores[False]["i2t R@5"] + 0.15, (scores[True], scores[False])
    assert scores[True]["vqa"]["all"] > scores[False]["vqa"]["all"]
    assert 0 < scores[True]["gates"]["mean_gate"] < 1


def test_token_baseline_learns_answers(tiny, tmp_path):
    _, data, bpe = tiny
    model = VLTokenModel(config(bpe), bpe)
    before = model.loss(data, torch.arange(32), "cpu")["loss"].item()
    train_vl(model, data, VLTrainConfig(steps=60, batch_size=32, lr=2e-3, warmup=5), Run(tmp_path))
    after = model.loss(data, torch.arange(32), "cpu")["loss"].item()
    assert after < before / 2
    scores = evaluate_token_model(model, data)
    assert set(scores) == {"vqa", "vqa generated"} and 0 <= scores["vqa generated"]["all"] <= 1


def test_save_and_load_round_trip(tiny, tmp_path):
    splits, data, bpe = tiny
    text_jepa = TextJEPA(TextEncoderConfig(vocab_size=bpe.vocab_size, dim=32, depth=1, heads=2, max_len=32), JEPAConfig(predictor_dim=16))
    save_text_jepa(tmp_path, text_jepa, bpe, seed=0, recipe={"steps": 0}, data={"hash": "x"})
    from jepa_lab.vl_jepa import load_y_encoder
    y = load_y_encoder(tmp_path)
    model = VLJEPA(config(bpe)).eval()
    save_vl_jepa(tmp_path, model, y, VLRecipe(n_train_worlds=40), data)
    loaded, y2, manifest = load_vl_jepa(tmp_path)
    ids, pad = left_padded_ids(bpe, [CAPTION_QUERY])
    x = data.x_tokens["test"][:1]
    assert torch.equal(model(x, ids, pad).pred, loaded(x, ids, pad).pred)
    assert torch.equal(y(["red"]), y2(["red"]))
    with open(tmp_path / "vl_jepa.safetensors", "r+b") as f:                  # a changed file is refused, by its hash
        f.seek(-4, 2); f.write(b"\0\0\0\1")
    with pytest.raises(VLError, match="sha256"):
        load_vl_jepa(tmp_path)


def test_token_baseline_is_causal_over_the_answer(tiny):
    "The logits for answer token j do not change when a later answer token changes (the backward scans skip the answer)."
    _, _, bpe = tiny
    torch.manual_seed(0)
    model = VLTokenModel(config(bpe), bpe).eval()
    with torch.no_grad():
        for block in model.backbone.back_blocks: block.conv.bias.fill_(1.0)      # a leak through the convolution would show
    x, q, pad = torch.randn(1, 64, 32), torch.tensor([[5, 6, 7]]), torch.zeros(1, 3, dtype=torch.bool)
    a = model.logits(x, q, pad, torch.tensor([[10, 11, 12]]))
    b = model.logits(x, q, pad, torch.tensor([[10, 11, 99]]))
    assert torch.equal(a[0, :3], b[0, :3]) and not torch.allclose(a[0, 3], b[0, 3])
