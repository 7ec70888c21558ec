"""Independent check of post-RoPE low rank on Qwen (own PCA, own projection; HF model, fp32), no plugin code
but the text windows and BasisFile.load. Every cached K/V replaced by c + P P^T (x - c) (latent in bf16),
every query attending over them, its own token included (as prefill_from_cache).

python qsim.py own 1 BASIS            # own centred PCA of HF K/V on 2 calibration windows vs the file's
python qsim.py sim N BASIS CFG,...    # N eval windows; CFG: base | file:RK:RV | own:RK:RV | fullfile:128:128
                                      # (file basis at full rank) | sink1:file:RK:RV (token 0 kept exact)
"""
import json, sys, time, math
import torch, torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_lowrank.models import qwen25_coder
from vllm_lowrank.textdata import eval_windows, calibration_windows
from vllm_lowrank.basis import BasisFile

torch.set_num_threads(2)
MODEL = qwen25_coder()
STATE = {"codec": {}, "capture": None}


def attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    L = module.layer_idx
    if STATE["capture"] is not None:
        STATE["capture"].setdefault(L, []).append((key[0].transpose(0, 1).double().clone(),
                                                   value[0].transpose(0, 1).double().clone()))
    c = STATE["codec"].get(L)
    if c is not None:
        kc, vc = c
        key = kc(key[0].transpose(0, 1).float()).transpose(0, 1)[None].to(query.dtype)
        value = vc(value[0].transpose(0, 1).float()).transpose(0, 1)[None].to(query.dtype)
    g = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1),
                                         is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("qsim", attn)
model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
model.config._attn_implementation = "qsim"
for l in model.model.layers:
    l.self_attn.config._attn_implementation = "qsim"
model.eval()
tok = AutoTokenizer.from_pretrained(str(MODEL))


@torch.no_grad()
def nll(wins):
    tot, n = 0.0, 0
    for w in wins:
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].float()
        tot += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += len(w) - 1
    return tot / n


SINK = [0]
def lowrank(P, c, bf16=True):
    """x [N,H,D] -> c + P (P^T (x - c)), latent rounded to bf16; P [H,D,r], c [H,D] or None"""
    def f(x):
        y = x - c if c is not None else x
        lat = torch.einsum("nhd,hdr->nhr", y, P)
        if bf16:
            lat = lat.to(torch.bfloat16).float()
        out = torch.einsum("nhr,hdr->nhd", lat, P)
        out = out + c if c is not None else out
        if SINK[0]:
            out[:SINK[0]] = x[:SINK[0]]
        return out
    return f


ident = lambda x: x
if __name__ == "__main__":
    mode = sys.argv[1]
    evw = eval_windows(tok, int(sys.argv[2]) if len(sys.argv) > 2 else 1, text="stdlib")
    res = {}
    if mode == "own":  # own PCA from HF K/V on calibration windows
        ncal = 2
        cal = calibration_windows(tok, ncal, text="stdlib")
        STATE["capture"] = {}
        with torch.no_grad():
            for w in cal:
                model(torch.tensor([w]))
        cap = STATE["capture"]; STATE["capture"] = None
        own = {}
        for L in range(28):
            K = torch.cat([a for a, b in cap[L]]); V = torch.cat([b for a, b in cap[L]])
            for t, X in (("k", K), ("v", V)):
                mu = X.mean(0)  # [H,D]
                C = torch.einsum("nhd,nhe->hde", X - mu, X - mu) / X.shape[0]
                w, u = torch.linalg.eigh(C)
                own[(t, L)] = (u.flip(-1).float(), w.flip(-1), mu.float())
        torch.save(own, "/tmp/own_basis.pt")
        bf = BasisFile.load(sys.argv[3])
        # compare with file
        rows = []
        for L in range(28):
            for t in ("k", "v"):
                u, w, mu = own[(t, L)]
                Pf = bf.bases[t][L][:, :, :96]
                Po = u[:, :, :96]
                ov = (torch.einsum("hdr,hds->hrs", Po, Pf) ** 2).sum((-1, -2)) / 96  # per head
                # swapped heads overlap
                ovs = (torch.einsum("hdr,hds->hrs", Po, Pf.flip(0)) ** 2).sum((-1, -2)) / 96
                en_own = (w[:, :96].sum(-1) / w.sum(-1))
                ef = bf.eigenvalues[t][L]
                en_file = ef[:, :96].sum(-1) / ef.sum(-1)
                off = bf.offsets[t][L]
                moff = float((off - mu).norm() / mu.norm())
                rows.append((L, t, [round(float(x), 3) for x in ov], [round(float(x), 3) for x in ovs],
                             [round(float(x), 4) for x in en_own], [round(float(x), 4) for x in en_file], round(moff, 3)))
                print(rows[-1], flush=True)
        sys.exit(0)
    bf = BasisFile.load(sys.argv[3]) if len(sys.argv) > 3 else None
    configs = sys.argv[4].split(",") if len(sys.argv) > 4 else ["base"]
    own = None
    for cfg in configs:
        t0 = time.time()
        # cfg: base | file:rk:rv | own:rk:rv | fileraw...
        STATE["codec"] = {}
        SINK[0] = 0
        if cfg.startswith("sink"):
            SINK[0] = int(cfg.split(":")[0][4:] or 1)
            cfg = cfg.split(":", 1)[1]
        if cfg != "base":
            src, rk, rv = cfg.split(":")[:3]
            layers = range(28)
            if len(cfg.split(":")) > 3:
                layers = [int(x) for x in cfg.split(":")[3].split("-")]
            rk, rv = int(rk), int(rv)
            for L in layers:
                fs = []
                for t, r in (("k", rk), ("v", rv)):
                    if r >= 128 and src != "fullfile":
                        fs.append(ident); continue
                    if src in ("file", "fullfile"):
                        P = bf.bases[t][L][:, :, :r].float(); c = bf.offsets[t][L]
                    else:
                        if own is None:
                            own = torch.load("/tmp/own_basis.pt")
                        u, w, mu = own[(t, L)]
                        P = u[:, :, :r].contiguous(); c = mu
                    fs.append(lowrank(P, c))
                STATE["codec"][L] = tuple(fs)
        v = nll(evw)
        res[cfg] = v
        print(json.dumps({"cfg": cfg, "sink": SINK[0], "nll": v, "ppl": math.exp(v), "s": round(time.time() - t0)}), flush=True)
