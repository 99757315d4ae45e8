#%% md
## Sampling and streaming

Generation asks an *engine* for the next-token logits: `start(prompt ids, soft prompt)` returns
the logits after the prompt, `step(token)` after one more token. `TorchEngine` runs the model
above, with its KV cache or (the naive baseline) recomputing the whole sequence every step;
`LlamaCppDecoder` below is the same interface over llama.cpp. Sampling is shared by both, so the
same seed draws the same reply from either engine: temperature (0 = greedy), top-k, top-p
(nucleus), a seeded generator, stop strings. `generate_text` streams text as it is decoded,
holding back only what could still be the start of a stop string or of a multi-byte character.
#%% code
#| export
@dataclass
class SamplingConfig:
    "How to pick each next token; temperature 0 is greedy."
    temperature: float = 0.8
    top_k: int = 40              # 0: no top-k cut
    top_p: float = 0.95          # 1: no nucleus cut
    seed: int = 0
    max_new_tokens: int = 48
    stop: tuple = ()             # stop strings (not emitted); the end-of-sequence id always stops

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise DecoderError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 0:
            raise DecoderError(f"need top_k ≥ 0, 0 < top_p ≤ 1, max_new_tokens ≥ 0; got {self.top_k}, {self.top_p}, {self.max_new_tokens}")
        self.stop = tuple(self.stop)

def sample_next(logits, config: SamplingConfig, generator: torch.Generator) -> int:
    "One token id from logits (V,): greedy at temperature 0, else softmax(logits / T) cut to top-k and top-p."
    logits = torch.as_tensor(logits).float()
    if config.temperature == 0: return int(logits.argmax())
    logits = logits / config.temperature
    if 0 < config.top_k < len(logits): logits[logits < logits.topk(config.top_k).values[-1]] = -math.inf
    if config.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= config.top_p             # tokens after the nucleus is full
        logits[order[drop]] = -math.inf
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))

class TorchEngine:
    "Next-token logits from the torch `Decoder`: with its KV cache, or recomputing the whole sequence (`cache=False`)."
    def __init__(self, model: Decoder, cache: bool = True):
        self.model, self.use_cache = model.eval(), cache

    @torch.no_grad()
    def start(self, ids, prefix: torch.Tensor | None = None) -> torch.Tensor:
        "Logits (V,) after `prefix` (k, D) and `ids` (T,)."
        self.ids, self.prefix = list(check_ids(torch.as_tensor(ids), self.model.config.vocab_size).tolist()), prefix
        self.cache = KVCache(self.model.config) if self.use_cache else None
        return self.model(torch.tensor([self.ids]) if self.ids else None, None if prefix is None else prefix[None], self.cache)[0, -1]

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        "Logits (V,) after one more token."
        self.ids.append(int(token))
        if self.use_cache: return self.model(torch.tensor([[int(token)]]), cache=self.cache)[0, -1]
        return self.model(torch.tensor([self.ids]), None if self.prefix is None else self.prefix[None])[0, -1]

def generate_ids(engine, ids, prefix=None, config: SamplingConfig = SamplingConfig(), eos_id: int | None = None) -> Iterator[int]:
    "Token ids sampled one at a time from `engine` after `prefix` and `ids`, until `eos_id` or `max_new_tokens`."
    generator, logits = torch.Generator().manual_seed(config.seed), engine.start(ids, prefix)
    for n in range(config.max_new_tokens):
        token = sample_next(logits, config, generator)
        if token == eos_id: return
        yield token
        if n + 1 < config.max_new_tokens: logits = engine.step(token)

def _safe_end(text: str, stops: tuple) -> int:
    "How much of `text` can be shown: all but a tail that could still grow into a stop string."
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops): return len(text) - n
    return len(text)

def generate_text(engine, tokenizer, ids, prefix=None, config: SamplingConfig = SamplingConfig()) -> Iterator[str]:
    "Stream the reply's text in pieces; stops at `<eos>`, a stop string (not shown) or `max_new_tokens`."
    out, shown, raw = "", 0, b""
    for token in generate_ids(engine, ids, prefix, config, tokenizer.special_id("<eos>")):
        raw += tokenizer.decode_bytes([token])
        out = raw.decode("utf-8", errors="ignore") if raw[-1:] and raw[-1] >= 0x80 else raw.decode("utf-8", errors="replace")
        hits = [out.find(s, max(0, shown - len(s))) for s in config.stop if s in out]
        if hits: yield out[shown:min(hits)]; return
        if (end := _safe_end(out, config.stop)) > shown: yield out[shown:end]; shown = end
    if len(out) > shown: yield out[shown:]
#%% code
engine = TorchEngine(decoder)
prompt = [bpe.special_id("<bos>"), *bpe.encode("Hello, how are you?"), bpe.special_id("<eos>")]
pieces = list(generate_text(engine, bpe, prompt, config=SamplingConfig(seed=1)))
print(repr("".join(pieces)), f"({len(pieces)} streamed pieces)")
same = "".join(generate_text(engine, bpe, prompt, config=SamplingConfig(seed=1)))
greedy_cached = list(generate_ids(engine, prompt, config=SamplingConfig(temperature=0, max_new_tokens=24)))
greedy_naive = list(generate_ids(TorchEngine(decoder, cache=False), prompt, config=SamplingConfig(temperature=0, max_new_tokens=24)))
assert same == "".join(pieces) and greedy_cached == greedy_naive      # seeded, and the cache changes nothing
stopped = "".join(generate_text(engine, bpe, prompt, config=SamplingConfig(seed=1, stop=(" ",))))
assert " " not in stopped and "".join(pieces).startswith(stopped)
#%% md
## GGUF export

GGUF is llama.cpp's file: a header of key–value metadata and named tensors. The export writes
the `llama` architecture's hyper-parameters, the tokenizer and the weights with the `gguf`
package. Three details make llama.cpp compute what torch computes (`../shared/NOTES.md`):

- **Rotary convention.** 04's `apply_rope` rotates feature i with feature i + d/2
  (`rotate_half`); llama.cpp's `llama` rotates adjacent pairs. Permuting the rows of W_q and W_k
  as llama.cpp's Hugging Face converter does makes the two identical; a wrong convention still
  runs and gives plausible text, which is why parity is a test.
- **Tokenizer.** Model `gpt2` (byte-level BPE): every token is written as GPT-2's printable
  stand-ins of its bytes, merges as "left right" pairs in rank order, the specials as control
  tokens (never produced by `tokenize()` from text, as with the lab's `allow_special=False`),
  BOS / EOS / PAD ids named explicitly, no automatic BOS.
- **Types.** f32 and f16 weights, or Q8_0 (blocks of 32 int8 with an f16 scale); norms stay f32.

The lab's config and a hash of the tokenizer go into the metadata too, so a loader can tell a
GGUF that does not belong to a config or tokenizer before llama.cpp ever sees it.
#%% code
#| export
import gguf

GGUF_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
GGUF_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                   "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

def gpt2_byte_chars() -> list[str]:
    "GPT-2's printable stand-in for each byte 0..255 (how byte-level BPE vocabularies are written)."
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars: chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]

def gguf_vocab(tokenizer: ByteBPE) -> tuple[list[str], list[int], list[str]]:
    "Token strings, token types (1 normal, 3 control) and merges of the lab's BPE in llama.cpp's gpt2 form."
    chars, specials = gpt2_byte_chars(), range(256, tokenizer.first_merge_id)
    tokens = [tokenizer.specials[i - 256] if i in specials else "".join(chars[b] for b in tokenizer.token_bytes(i))
              for i in range(tokenizer.vocab_size)]
    if len(set(tokens)) != len(tokens):
        dup = next(t for t in tokens if tokens.count(t) > 1)
        raise DecoderError(f"the tokenizer has two ids for the bytes {dup!r}: llama.cpp cannot tell them apart")
    return tokens, [3 if i in specials else 1 for i in range(len(tokens))], [f"{tokens[a]} {tokens[b]}" for a, b in tokenizer.merges]

def tokenizer_hash(tokenizer: ByteBPE) -> str:
    return data_hash(json.dumps([tokenizer.merges, tokenizer.specials, tokenizer.pattern]).encode())

def permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    "Rows of W_q / W_k from rotate-half order to llama.cpp's adjacent pairs (its HF converter's permutation)."
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def gguf_tensors(model: Decoder) -> dict[str, torch.Tensor]:
    "The decoder's weights under llama.cpp's tensor names."
    c, sd = model.config, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["tok_embeddings.weight"], "output_norm.weight": sd["norm.weight"],
           "output.weight": sd["output.weight"]}
    for i in range(c.depth):
        p = f"layers.{i}."
        out.update({f"blk.{i}.attn_norm.weight": sd[p + "attn_norm.weight"],
                    f"blk.{i}.attn_q.weight": permute_rotary(sd[p + "attn.wq.weight"], c.heads),
                    f"blk.{i}.attn_k.weight": permute_rotary(sd[p + "attn.wk.weight"], c.kv_heads),
                    f"blk.{i}.attn_v.weight": sd[p + "attn.wv.weight"], f"blk.{i}.attn_output.weight": sd[p + "attn.wo.weight"],
                    f"blk.{i}.ffn_norm.weight": sd[p + "ffn_norm.weight"], f"blk.{i}.ffn_gate.weight": sd[p + "ffn.w1.weight"],
                    f"blk.{i}.ffn_up.weight": sd[p + "ffn.w3.weight"], f"blk.{i}.ffn_down.weight": sd[p + "ffn.w2.weight"]})
    return out

def _add_weight(writer, name: str, w: torch.Tensor, dtype: str):
    a = w.numpy().astype(np.float32)
    if a.ndim == 1 or dtype == "f32": writer.add_tensor(name, a)
    elif dtype == "f16": writer.add_tensor(name, a.astype(np.float16))
    else:
        if a.shape[-1] % 32: raise DecoderError(f"Q8_0 needs rows that are multiples of 32; {name} has rows of {a.shape[-1]}")
        writer.add_tensor(name, gguf.quants.quantize(a, GGUF_TYPES["q8_0"]), raw_dtype=GGUF_TYPES["q8_0"])

def export_gguf(model: Decoder, tokenizer: ByteBPE, path, dtype: str = "f32") -> Path:
    "Write `model` and `tokenizer` as a llama.cpp GGUF (`dtype` f32, f16 or q8_0), atomically."
    if dtype not in GGUF_TYPES: raise DecoderError(f"GGUF dtype {dtype!r}: choose one of {list(GGUF_TYPES)}")
    c, path = model.config, Path(path)
    if tokenizer.vocab_size != c.vocab_size:
        raise DecoderError(f"tokenizer has {tokenizer.vocab_size} tokens but the decoder's vocab_size is {c.vocab_size}")
    tokens, types, merges = gguf_vocab(tokenizer)
    def write(tmp):
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_context_length(c.max_len); w.add_embedding_length(c.dim); w.add_block_count(c.depth)
        w.add_feed_forward_length(c.ffn_hidden); w.add_head_count(c.heads); w.add_head_count_kv(c.kv_heads)
        w.add_layer_norm_rms_eps(c.norm_eps); w.add_rope_freq_base(c.rope_base); w.add_rope_dimension_count(c.head_dim)
        w.add_vocab_size(c.vocab_size); w.add_file_type(GGUF_FILE_TYPES[dtype])
        w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens); w.add_token_types(types); w.add_token_merges(merges)
        w.add_bos_token_id(tokenizer.special_id("<bos>")); w.add_eos_token_id(tokenizer.special_id("<eos>"))
        w.add_pad_token_id(tokenizer.special_id("<pad>")); w.add_add_bos_token(False); w.add_add_eos_token(False)
        w.add_string("jepa_lab.config", json.dumps(asdict(c))); w.add_string("jepa_lab.tokenizer_hash", tokenizer_hash(tokenizer))
        for name, t in gguf_tensors(model).items(): _add_weight(w, name, t, dtype)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _atomic_write(path, write)
    return path
#%% md
Before llama.cpp opens a file, `check_gguf` reads it with the `gguf` package's reader: a missing
file, a truncated one (a tensor whose data runs past the end), another architecture, or
metadata that disagrees with the expected config or tokenizer is a `DecoderError` naming the
field — llama.cpp would otherwise fail deep inside, or load the wrong model without a word.
#%% code
#| export
from jepa_lab.core import _atomic_write

def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()

def check_gguf(path, config: DecoderConfig | None = None, tokenizer: ByteBPE | None = None) -> dict:
    "Metadata of a lab GGUF file, checked: readable, complete, `llama`, and matching `config` / `tokenizer` when given."
    path = Path(path)
    if not path.is_file(): raise DecoderError(f"GGUF file {path} does not exist; write one with export_gguf")
    try: reader = gguf.GGUFReader(path)
    except Exception as e:
        raise DecoderError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated: export it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise DecoderError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,} of {size:,}")
    if (arch := _field(reader, "general.architecture")) != "llama":
        raise DecoderError(f"{path} holds architecture {arch!r}, not 'llama'")
    stored = json.loads(_field(reader, "jepa_lab.config") or "{}")
    meta = {"config": stored, "tokenizer_hash": _field(reader, "jepa_lab.tokenizer_hash"),
            "n_tokens": len(_field(reader, "tokenizer.ggml.tokens") or []), "tensors": len(reader.tensors),
            "context_length": _field(reader, "llama.context_length"), "embedding_length": _field(reader, "llama.embedding_length")}
    if config is not None:
        want = json.loads(json.dumps(asdict(config)))
        diff = [f"{k}: file {stored.get(k)!r} vs config {v!r}" for k, v in want.items() if stored.get(k) != v]
        diff += [f"{key}: file {got} vs config {v}" for key, v in
                 [("llama.context_length", config.max_len), ("llama.embedding_length", config.dim), ("llama.block_count", config.depth),
                  ("llama.attention.head_count", config.heads), ("llama.attention.head_count_kv", config.kv_heads),
                  ("llama.feed_forward_length", config.ffn_hidden), ("tokenizer.ggml.tokens (count)", config.vocab_size)]
                 if (got := meta["n_tokens"] if key.startswith("tokenizer") else _field(reader, key)) != v]
        if diff: raise DecoderError(f"{path} does not match the decoder config: " + "; ".join(diff))
    if tokenizer is not None and meta["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise DecoderError(f"{path} was written with another tokenizer (hash {str(meta['tokenizer_hash'])[:12]} vs "
                           f"{tokenizer_hash(tokenizer)[:12]}): export it again with this one")
    return meta
#%% md
## llama.cpp as the engine

`LlamaCppDecoder` opens a checked GGUF with llama-cpp-python and talks to llama.cpp's C API
through its batch interface: a batch holds either token ids or rows of input embeddings (a soft
prompt), never both, so a prompt with a soft prompt is two `llama_decode` calls and the KV cache
carries the first into the second. The KV cache is f32 (`type_k = type_v = 0`) for exact parity
(the default f16 cache costs ~3e-4 in the logits). llama.cpp *aborts the process* on some bad
inputs — an id outside the vocabulary, more rows than the batch holds, a sequence past the
context — so every one is checked here first and raised as a `DecoderError`.
#%% code
#| export
import llama_cpp

class LlamaCppDecoder:
    "A lab GGUF served by llama.cpp: `logits`, `tokenize`, and the `start` / `step` engine interface, with soft prompts."
    def __init__(self, path, config: DecoderConfig | None = None, tokenizer: ByteBPE | None = None,
                 n_batch: int = 256, threads: int | None = None, f32_cache: bool = True):
        self.meta = check_gguf(path, config, tokenizer)
        self.n_ctx, self.n_embd, self.n_batch = int(self.meta["context_length"]), int(self.meta["embedding_length"]), n_batch
        cache_type = {"type_k": 0, "type_v": 0} if f32_cache else {}
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=self.n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, verbose=False, **cache_type)
        self.ctx, self.n_vocab = self.llm._ctx.ctx, self.llm.n_vocab()
        self._ids_batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._emb_batch = llama_cpp.llama_batch_init(n_batch, self.n_embd, 1)
        self.pos = 0

    def close(self):
        for name in ("_ids_batch", "_emb_batch"):
            if getattr(self, name, None) is not None: llama_cpp.llama_batch_free(getattr(self, name)); setattr(self, name, None)
        if getattr(self, "llm", None) is not None: self.llm.close(); self.llm = None
    def __del__(self):
        try: self.close()
        except Exception: pass

    def reset(self):
        "Forget the sequence (clears llama.cpp's KV cache; `Llama.reset()` alone does not)."
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.pos = 0

    def tokenize(self, text: str) -> list[int]:
        "llama.cpp's own tokenizer: no BOS, special-token text left as text."
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _room(self, n: int, what: str):
        if self.pos + n > self.n_ctx:
            raise DecoderError(f"{what}: {self.pos} positions used + {n} new exceed the context length {self.n_ctx}")

    def _decode(self, batch, n: int, all_logits: bool) -> np.ndarray:
        for j in range(n):
            batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = self.pos + j, 1, 0
            batch.logits[j] = all_logits or j == n - 1
        batch.n_tokens = n
        if (rc := llama_cpp.llama_decode(self.ctx, batch)) != 0: raise DecoderError(f"llama_decode failed with code {rc}")
        self.pos += n
        rows = range(n) if all_logits else [n - 1]
        return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,)).copy() for j in rows])

    def feed_ids(self, ids, all_logits: bool = False) -> np.ndarray:
        "Decode token ids (in chunks of n_batch): logits (T, V) of every position, or (1, V) of the last."
        ids = check_ids(torch.as_tensor(list(ids), dtype=torch.long), self.n_vocab).tolist()
        if not ids: raise DecoderError("no token ids to decode")
        self._room(len(ids), "token ids")
        out = []
        for lo in range(0, len(ids), self.n_batch):
            chunk = ids[lo:lo + self.n_batch]
            for j, t in enumerate(chunk): self._ids_batch.token[j] = t
            out.append(self._decode(self._ids_batch, len(chunk), all_logits or lo + self.n_batch >= len(ids)))
        return np.concatenate(out) if all_logits else out[-1][-1:]

    def feed_embeddings(self, rows, all_logits: bool = False) -> np.ndarray:
        "Decode rows of input embeddings (k, n_embd) as one batch: a soft prompt."
        rows = np.ascontiguousarray(torch.as_tensor(rows).detach().float().cpu().numpy())
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise DecoderError(f"soft prompt must be (k, {self.n_embd}), got {rows.shape}")
        if len(rows) > self.n_batch:
            raise DecoderError(f"soft prompt of {len(rows)} rows exceeds the batch size n_batch={self.n_batch}: open the model with a larger n_batch")
        if not np.isfinite(rows).all(): raise DecoderError("soft prompt holds NaN or inf")
        self._room(len(rows), "soft prompt")
        ctypes.memmove(self._emb_batch.embd, rows.ctypes.data, rows.nbytes)
        return self._decode(self._emb_batch, len(rows), all_logits)

    def logits(self, ids, prefix=None) -> np.ndarray:
        "Logits (k + T, V) of every position of `prefix` (k, D) then `ids` (T,), from an empty cache."
        ids = list(ids)
        self._room((0 if prefix is None else len(prefix)) + len(ids) - self.pos, "prompt")   # checked before decoding anything
        self.reset()
        parts = ([] if prefix is None else [self.feed_embeddings(prefix, True)]) + ([self.feed_ids(ids, True)] if ids else [])
        return np.concatenate(parts)

    def start(self, ids, prefix=None) -> torch.Tensor:
        ids = list(ids)
        n_prefix = 0 if prefix is None else len(prefix)
        if n_prefix + len(ids) > self.n_ctx:
            raise DecoderError(f"prompt: soft prompt {n_prefix} + {len(ids)} ids exceed the context length {self.n_ctx}")
        self.reset()
        last = self.feed_embeddings(prefix) if prefix is not None else None
        if ids: last = self.feed_ids(ids)
        if last is None: raise DecoderError("give token ids, a soft prompt, or both")
        return torch.from_numpy(last[-1])

    def step(self, token: int) -> torch.Tensor: return torch.from_numpy(self.feed_ids([token])[-1])
