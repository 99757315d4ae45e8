"""Parity of the lab's MiniLM (lesson 06b, torch) with the reference: Hugging Face transformers' BertModel, mean pooling
over real tokens, L2 normalisation (what sentence-transformers does for all-MiniLM-L6-v2), loaded from the same wheel folder.

Prints the largest absolute difference of the embeddings and exits 1 above the tolerance (1e-5), 2 when transformers is missing.
transformers is not a lab dependency; one way to run this without touching the venv:
    .venv/bin/pip install --no-deps --target /tmp/tf transformers
    PYTHONPATH=/tmp/tf .venv/bin/python benchmarks/minilm_parity.py
"""
import argparse
import sys

import torch
import torch.nn.functional as F

SENTENCES = ["What is AI?", "Do you like cheese?", "Artificial Intelligence is the branch of engineering and science "
             "devoted to constructing machines that think.", "The printer on the second floor is jammed again.",
             "Ok.", "Tell me a joke about computers, databases and the meaning of life, in under twenty words please!"]

def reference_embeddings(folder, sentences) -> torch.Tensor:
    "Sentence embeddings by transformers' BertModel + its tokenizer from `folder`: masked mean pooling, then L2 norm."
    from transformers import AutoTokenizer, BertModel
    tok = AutoTokenizer.from_pretrained(str(folder))
    try: model = BertModel.from_pretrained(str(folder), attn_implementation="eager", use_kernels=False)   # 5.x: no hub kernels
    except TypeError: model = BertModel.from_pretrained(str(folder), attn_implementation="eager")          # before use_kernels
    model.eval()
    batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad(): hidden = model(**batch).last_hidden_state                     # (N, T, 384)
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tol", type=float, default=1e-5)
    args = p.parse_args(argv)
    try: import transformers
    except ImportError:
        print("transformers is not importable: pip install --no-deps --target /tmp/tf transformers; PYTHONPATH=/tmp/tf", file=sys.stderr)
        return 2
    from jepa_lab.jepa_eval import load_minilm, minilm_dir
    from jepa_lab.jepa_finetune import encode_with_grad
    torch.set_num_threads(1)
    lab = load_minilm(max_length=256)
    ref = reference_embeddings(minilm_dir(), SENTENCES)
    ours = lab.encode(SENTENCES)
    with torch.no_grad(): ours_grad_path = encode_with_grad(lab, SENTENCES)
    diff = float((ours - ref).abs().max())
    diff_grad = float((ours_grad_path - ref).abs().max())
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {len(SENTENCES)} sentences, 384-d")
    print(f"max |lab MiniLM.encode - HF BertModel| = {diff:.3e}")
    print(f"max |lab encode_with_grad - HF BertModel| = {diff_grad:.3e}")
    ok = max(diff, diff_grad) <= args.tol
    print("PARITY OK" if ok else f"PARITY FAILED: above {args.tol:g}")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
