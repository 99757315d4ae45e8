exec(open('/tmp/nb10/lib1.py').read())
import re as _re
p2 = open('/tmp/nb10/part2.py').read()
parts = _re.split(r"^#%% (md|code|params)[ \t]*\n", p2, flags=_re.M)
for kind, body in zip(parts[1::2], parts[2::2]):
    if body.startswith("#| export"): exec(body)
torch.manual_seed(0)
m = Decoder(DecoderConfig(vocab_size=bpe.vocab_size)).eval()
with torch.no_grad():
    for n,p in m.named_parameters(): p.add_(torch.randn_like(p)*0.05)
for dt in ["f32","f16","q8_0"]:
    path = export_gguf(m, bpe, f"/tmp/nb10/m-{dt}.gguf", dt)
    ll = LlamaCppDecoder(path, m.config, bpe, threads=2)
    ids = streams["test"][0][:60]
    a = ll.logits(ids); b = m(torch.tensor([ids]))[0].detach().numpy()
    print(dt, "max diff", abs(a-b).max(), "argmax agree", (a.argmax(-1)==b.argmax(-1)).mean())
    pre = torch.randn(4, 128)*0.05
    a = ll.logits(ids, pre); b = m(torch.tensor([ids]), pre[None])[0].detach().numpy()
    print(dt, "soft max diff", abs(a-b).max())
    if dt=="f32":
        g1 = list(generate_ids(ll, ids[:10], config=SamplingConfig(temperature=0, max_new_tokens=32)))
        g2 = list(generate_ids(TorchEngine(m), ids[:10], config=SamplingConfig(temperature=0, max_new_tokens=32)))
        print("greedy equal", g1==g2, len(g1))
        texts = [t for c in split_conversations(read_conversations(), seed=0)["test"] for t in c.turns]
        bad = [t for t in texts if ll.tokenize(t) != bpe.encode(t)]
        print("tokenize mismatches", len(bad), "of", len(texts), bad[:3])
    ll.close()
