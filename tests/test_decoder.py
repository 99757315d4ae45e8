"Lesson 10's decoder: the KV cache, causality, bad input, and learning (a seeded tiny run beats the bigram baseline)."
import tempfile
from pathlib import Path

import pytest
import torch

from jepa_lab.core import Run
from jepa_lab.decoder import (Decoder, DecoderConfig, DecoderError, DecoderTrainConfig, KVCache, decoder_perplexity,
                              dialog_streams, ngram_perplexities, train_bpe_on_dialog, train_decoder)


def tiny(**kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=300, dim=32, depth=2, heads=4, kv_heads=2, ffn_hidden=64, max_len=32, **kw)).eval()


def test_kv_cache_matches_full_forward_and_is_causal():
    m, ids = tiny(), torch.randint(0, 300, (2, 20))
    full = m(ids)
    cache = KVCache(m.config, batch=2)
    parts = [m(ids[:, :7], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)
    changed = ids.clone(); changed[:, 10] = (changed[:, 10] + 1) % 300
    out = m(changed)
    assert torch.allclose(out[:, :10], full[:, :10], atol=1e-6) and not torch.allclose(out[:, 10:], full[:, 10:])


def test_bad_input_is_a_clear_error():
    m = tiny()
    with pytest.raises(DecoderError, match="outside the vocabulary"): m(torch.tensor([[1, 300]]))
    with pytest.raises(DecoderError, match="context length"): m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(DecoderError, match="multiple of kv_heads"): DecoderConfig(heads=4, kv_heads=3)
    with pytest.raises(DecoderError, match="give token ids"): m()


def test_a_seeded_tiny_decoder_beats_the_bigram_baseline():
    torch.manual_seed(0)
    bpe = train_bpe_on_dialog(512, 0)
    streams = dialog_streams(bpe, 0)
    base = ngram_perplexities(streams["train"], streams["validation"], streams["test"], bpe.vocab_size)
    m = Decoder(DecoderConfig(vocab_size=bpe.vocab_size, dim=64, depth=2, heads=4, kv_heads=2, ffn_hidden=128, max_len=128))
    stream = torch.tensor([i for s in streams["train"] for i in s])
    train_decoder(m, stream, DecoderTrainConfig(steps=200, batch_size=16, seq_len=64, lr=3e-3, warmup=20, ckpt_every=1000),
                  Run(Path(tempfile.mkdtemp())), seed=0)
    ppl = decoder_perplexity(m, streams["test"])
    assert ppl < 0.9 * base["bigram"] < base["unigram"], (ppl, base)
