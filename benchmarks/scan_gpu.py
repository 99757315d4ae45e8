"""Mamba-2's SSD scan (lesson 04a) on a GPU: the sequential loop against the chunked scan, eager and compiled.

For each length it times forward and forward + backward (from a fixed random gradient of y) of
  loop            ssd_sequential, one step per token, eager
  chunked         ssd_chunked, eager
  chunked+compile torch.compile(ssd_chunked)
  loop+compile    the Python loop calling a torch.compile'd single step ("torch.compile of the loop")
  mamba_ssm       mamba_ssm's Triton kernel mamba_chunk_scan_combined, when `import mamba_ssm` works
on the same float32 inputs, and states each one's error relative to the sequential loop run in float64.
Prints a table and writes JSON to --out. A compile failure is printed and the script carries on.

    .venv/bin/python benchmarks/scan_gpu.py --out scan_gpu.json                          # H200: lengths 1024 and 4096
    .venv/bin/python benchmarks/scan_gpu.py --device cpu --length 256 --out /tmp/s.json  # quick check on a CPU
"""
import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository's jepa_lab, installed or not
from jepa_lab.chunked_scan import random_ssd_inputs, ssd_chunked, ssd_sequential  # noqa: E402
from jepa_lab.encoders import _best_time, _relative_error  # noqa: E402


def _step(S, a_t, x_t, B_t, C_t):
    "One token of the recurrence: S = a_t S + x_t ⊗ B_t, y_t = S C_t (shapes as in ssd_sequential's loop)."
    S = a_t * S + x_t * B_t
    return S, S @ C_t


def loop_with(step, x, dt, A, B, C, D):
    "ssd_sequential's loop with `step` (eager or compiled) for the body -> y (b, l, h, p)."
    b, l, h, p = x.shape
    decay, x_dt = torch.exp(dt * A)[..., None, None], (x * dt[..., None])[..., None]
    S, ys = x.new_zeros(b, h, p, B.shape[-1]), []
    for a_t, x_t, B_t, C_t in zip(decay.unbind(1), x_dt.unbind(1), B[:, :, None, None, :].unbind(1), C[:, :, None, :, None].unbind(1)):
        S, y_t = step(S, a_t, x_t, B_t, C_t)
        ys.append(y_t)
    return torch.stack(ys, 1).squeeze(-1) + x * D[:, None]


def variants(chunk: int, compile_mode: str | None, use_compile: bool) -> tuple[dict, dict]:
    "{name: fn(x, dt, A, B, C, D) -> y} and {name: why it is missing}."
    fns, missing = {"loop": lambda *a: ssd_sequential(*a)[0], "chunked": lambda *a: ssd_chunked(*a, chunk=chunk)[0]}, {}
    if use_compile:
        compiled = torch.compile(functools.partial(ssd_chunked, chunk=chunk), dynamic=False, mode=compile_mode)
        fns["chunked+compile"] = lambda *a: compiled(*a)[0]
        fns["loop+compile"] = functools.partial(loop_with, torch.compile(_step, dynamic=False, mode=compile_mode))
    else:
        missing["chunked+compile"] = missing["loop+compile"] = "skipped (--no-compile)"
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        fns["mamba_ssm"] = lambda x, dt, A, B, C, D: mamba_chunk_scan_combined(x, dt, A, B[:, :, None], C[:, :, None], chunk, D=D)
    except Exception as e:                                                  # ImportError, or a broken build
        missing["mamba_ssm"] = f"absent ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return fns, missing


def measure(fn, inputs, grad_y, ref_y, ref_grads, repeats: int, inner: int, device) -> dict:
    "Warm up (compiles), then errors against the float64 loop, then the best of `repeats` × `inner` timed calls."
    def forward():
        with torch.no_grad(): return fn(*inputs)
    def forward_backward():
        return torch.autograd.grad(fn(*inputs), inputs, grad_y)
    t0 = time.perf_counter()
    y, grads = forward(), forward_backward()                               # the first calls compile
    warmup_s = time.perf_counter() - t0
    out = dict(warmup_s=warmup_s, rel_err_y=_relative_error(y.double(), ref_y),
               rel_err_grad=max(_relative_error(g.double(), r) for g, r in zip(grads, ref_grads)))
    out["fwd_s"] = min(_best_time(forward, inner, device) for _ in range(repeats))
    out["fwd_bwd_s"] = min(_best_time(forward_backward, inner, device) for _ in range(repeats))
    return out


def run_length(length: int, args, device) -> list[dict]:
    inputs64 = [t.to(device) for t in random_ssd_inputs(args.batch, length, args.heads, args.head_dim, args.d_state,
                                                        dtype=torch.float64, seed=args.seed)]
    grad_y64 = torch.randn(args.batch, length, args.heads, args.head_dim, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    leaves64 = [t.clone().requires_grad_() for t in inputs64]
    y64 = ssd_sequential(*leaves64)[0]
    ref_grads = torch.autograd.grad(y64, leaves64, grad_y64)
    inputs = [t.float().requires_grad_() for t in inputs64]
    grad_y = grad_y64.float()
    fns, missing = variants(args.chunk, args.compile_mode, not args.no_compile)
    rows = []
    for name, fn in fns.items():
        row = dict(length=length, variant=name, error=None)
        try: row |= measure(fn, inputs, grad_y, y64.detach(), ref_grads, args.repeats, args.inner, device)
        except Exception as e:                                              # a compile or kernel failure: report, carry on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"T={length} {name} failed: {row['error']}", flush=True)
        rows.append(row)
        if device.type == "cuda": torch.cuda.empty_cache()
    rows += [dict(length=length, variant=name, error=why) for name, why in missing.items()]
    return rows


def print_table(rows: list[dict]):
    print(f"{'T':>6s}  {'variant':16s}{'fwd ms':>10s}{'fwd+bwd ms':>12s}{'× loop fwd':>12s}{'× loop f+b':>12s}"
          f"{'rel err y':>11s}{'rel err grad':>13s}")
    for length in sorted({r["length"] for r in rows}):
        loop = next((r for r in rows if r["length"] == length and r["variant"] == "loop" and not r["error"]), None)
        for r in (r for r in rows if r["length"] == length):
            if r["error"]:
                print(f"{length:6d}  {r['variant']:16s}  {r['error']}")
                continue
            speed = (f"{loop['fwd_s'] / r['fwd_s']:11.1f}x{loop['fwd_bwd_s'] / r['fwd_bwd_s']:11.1f}x" if loop else " " * 24)
            print(f"{length:6d}  {r['variant']:16s}{r['fwd_s'] * 1e3:10.3f}{r['fwd_bwd_s'] * 1e3:12.3f}{speed}"
                  f"{r['rel_err_y']:11.1e}{r['rel_err_grad']:13.1e}")
    print("errors: max |variant − float64 loop| / max |float64 loop|, for y and for the worst of the input gradients")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--length", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64, help="chunk length of ssd_chunked and of mamba_ssm")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the best counts")
    p.add_argument("--inner", type=int, default=3, help="back-to-back calls per round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune (default: PyTorch's default)")
    p.add_argument("--no-compile", action="store_true", help="skip the two torch.compile variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("scan_gpu.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu": torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} thread(s)"
    print(f"SSD scan, float32, batch {args.batch}, {args.heads} heads × {args.head_dim}, d_state {args.d_state}, chunk {args.chunk}, "
          f"{name}, torch {torch.__version__}, best of {args.repeats} × {args.inner}", flush=True)
    rows = []
    for length in args.length:
        rows += run_length(length, args, device)
    print_table(rows)
    for r in rows:
        if r["variant"] == "mamba_ssm" and r["error"]: print(f"mamba_ssm: {r['error']}")
    record = dict(device=str(device), device_name=name, torch=torch.__version__, config={k: (str(v) if isinstance(v, Path) else v)
                  for k, v in vars(args).items()}, results=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
