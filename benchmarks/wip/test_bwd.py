"""GPU check + timing of the Gluon one-pass backward (kernels/attention_sm90_bwd.py). Run from the repo root with
stdit importable; writes $OUT/bwd.json."""
import importlib.util, json, os, sys, traceback
import torch, triton
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from stdit.kernels import attention as ka
from stdit.kernels.attention_ref import attention_ref
from stdit.kernels import attention_sm90_bwd as kb
ka._ensure_allocator()
out = {"check": [], "bench": []}

def inputs(b, sq, sk, h, d, dtype, fused=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if fused:
        qkv = torch.randn(b, sq, 3, h, d, device="cuda", generator=g).to(dtype)
        q, k, v = qkv.unbind(2)
    else:
        q = torch.randn(b, sq, h, d, device="cuda", generator=g).to(dtype)
        k = torch.randn(b, sk, h, d, device="cuda", generator=g).to(dtype)
        v = torch.randn(b, sk, h, d, device="cuda", generator=g).to(dtype)
    do = torch.randn(b, q.shape[1], h, d, device="cuda", generator=g).to(dtype)
    return q, k, v, do

def ours(q, k, v, do, stages=2):
    o, lse = ka.flash_attention_forward(q, k, v)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
    return kb.backward(do, q, k, v, o, lse, delta, q.shape[-1] ** -0.5, stages=stages)

def ref_grads(q, k, v, do, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = attention_ref(q, k, v, None, dtype=dtype)
    return torch.autograd.grad(o, (q, k, v), do.to(o.dtype))

for case in [(1, 1000, 1000, 2, 128, torch.bfloat16, False), (2, 1000, 77, 3, 128, torch.bfloat16, False),
             (2, 77, 1000, 2, 128, torch.float16, False), (1, 4097, 4097, 2, 128, torch.bfloat16, True),
             (1, 1, 300, 2, 128, torch.float16, False), (1, 128, 256, 1, 128, torch.bfloat16, False)]:
    b, sq, sk, h, d, dtype, fused = case
    row = {"case": str(case)}
    try:
        q, k, v, do = inputs(b, sq, sk, h, d, dtype, fused, seed=sq + sk)
        got = ours(q, k, v, do)
        ref = ref_grads(q, k, v, do, torch.float32)
        low = ref_grads(q, k, v, do, dtype)
        for name, x, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
            err = (x.float() - r).abs().max().item(); lerr = (lo.float() - r).abs().max().item()
            row[name] = [err, lerr, bool(err <= 2 * lerr + 1e-3 * r.abs().max().item())]
    except Exception as e:
        row["error"] = traceback.format_exc()[-1500:]
    print(row, flush=True)
    out["check"].append(row)

def tf(ms, b, h, s, d, mult): return mult * 4 * b * h * s * s * d / ms / 1e9
for b, h, s, d in [(1, 12, 32760, 128), (1, 12, 4096, 128), (1, 40, 32760, 128)]:
    q, k, v, do = inputs(b, s, s, h, d, torch.bfloat16)
    o, lse = ka.flash_attention_forward(q, k, v)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
    row = {"shape": f"B{b} H{h} S{s} d{d}"}
    rep = 100 if s > 20000 else 300
    for stages in (2, 3):
        try:
            ms = triton.testing.do_bench(lambda: kb.backward(do, q, k, v, o, lse, delta, d ** -0.5, stages=stages), warmup=10, rep=rep)
            row[f"gluon bwd st{stages} ms"] = ms; row[f"gluon bwd st{stages} TF/s"] = tf(ms, b, h, s, d, 2.5)
        except Exception as e:
            row[f"gluon st{stages}"] = traceback.format_exc()[-600:]
    ms = triton.testing.do_bench(lambda: ka.flash_attention_backward(do, q, k, v, o, lse), warmup=10, rep=rep)
    row["triton two-pass ms"] = ms; row["triton two-pass TF/s"] = tf(ms, b, h, s, d, 2.5)
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ot = F.scaled_dot_product_attention(qt, kt, vt)
        dot = do.transpose(1, 2)
        ms = triton.testing.do_bench(lambda: torch.autograd.grad(ot, (qt, kt, vt), dot, retain_graph=True), warmup=10, rep=rep)
    row["cudnn bwd ms"] = ms; row["cudnn bwd TF/s"] = tf(ms, b, h, s, d, 2.5)
    print(row, flush=True)
    out["bench"].append(row)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "bwd.json"), "w"), indent=1)
