"""tinyllm's GPT and pretraining recipe written in PyTorch, for side-by-side speed and quality.

A dev-only script: it runs in a separate virtual environment that has torch and numpy (never a
dependency of tinyllm, and nothing in tinyllm or its tests imports it). It imports nothing
from tinyllm, so every piece that must match is written out here, and matches as follows:

- the model: tinyllm's GPT (models.py): token + learned position embeddings, pre-LN blocks of
  causal self-attention (one (C, 3C) projection) and a C -> 4C -> GELU (tanh form) -> C MLP,
  a final layer norm, the LM head tied to the token embedding; biases optional (off by
  default, as in nanoGPT's CPU recipe); weights stored (C_in, C_out) and applied as x @ W;
- the initial weights: drawn by numpy's Generator from the seed in the same order and with the
  same scales as tinyllm's `init_gpt`, so both start from the same numbers;
- the data: the sorted distinct characters as the vocabulary, the first 90% to train on, and
  each step's batch drawn by the same Generator, continued after the initialisation, as
  tinyllm's `get_batch` draws it: the same batches in the same order;
- the optimizer: AdamW (betas 0.9/0.99, eps 1e-8, weight decay 0.1 on tensors with ndim >= 2
  only), gradient clipping to a global norm of 1.0, linear warm-up then cosine decay;
- evaluation: at step 0 and every --eval-interval steps, the mean loss over --eval-iters
  batches per split from a Generator seeded by (seed, step), train batches drawn first, as
  tinyllm's `estimate_loss` draws them.

Attention uses PyTorch's `scaled_dot_product_attention` with is_causal=True, as nanoGPT does.
Prints one JSON object: timings, peak memory and the last evaluation.

    /path/to/torch-venv/bin/python benchmarks/torch_reference.py --data tinyshakespeare.txt
"""

import argparse
import json
import math
import resource
import sys
import time

import numpy as np

INIT_STD = 0.02  # GPT-2's initialisation, as in tinyllm


def init_params(rng, vocab, block, n_layer, n_embd, bias):
    """GPT weights as numpy float32 arrays, drawn in tinyllm's `init_gpt` order."""
    def linear(c_in, c_out, std=INIT_STD):
        layer = {"w": (rng.standard_normal((c_in, c_out)) * std).astype("float32")}
        if bias:
            layer["b"] = np.zeros(c_out, dtype="float32")
        return layer

    def norm():
        return {"g": np.ones(n_embd, "float32"), **({"b": np.zeros(n_embd, "float32")} if bias else {})}

    params = {"wte": (rng.standard_normal((vocab, n_embd)) * INIT_STD).astype("float32"),
              "wpe": (rng.standard_normal((block, n_embd)) * INIT_STD).astype("float32"), "h": []}
    proj_std = INIT_STD / math.sqrt(2 * n_layer)
    for _ in range(n_layer):
        params["h"].append({"ln_1": norm(), "c_attn": linear(n_embd, 3 * n_embd),
                            "attn_proj": linear(n_embd, n_embd, proj_std), "ln_2": norm(),
                            "c_fc": linear(n_embd, 4 * n_embd),
                            "mlp_proj": linear(4 * n_embd, n_embd, proj_std)})
    params["ln_f"] = norm()
    return params


def build_model(torch, params, n_head):
    """The forward pass and the list of tensors to train, from the numpy parameters."""
    F = torch.nn.functional
    t = lambda a: torch.from_numpy(a.copy()).requires_grad_(True)  # noqa: E731
    p = {"wte": t(params["wte"]), "wpe": t(params["wpe"]), "ln_f": {k: t(v) for k, v in params["ln_f"].items()},
         "h": [{name: {k: t(v) for k, v in sub.items()} for name, sub in blk.items()}
               for blk in params["h"]]}

    def lin(x, layer):
        y = x @ layer["w"]
        return y + layer["b"] if "b" in layer else y

    def ln(x, norm):
        return F.layer_norm(x, (x.shape[-1],), norm["g"], norm.get("b"), 1e-5)

    def loss_fn(idx, targets):
        b, t_len = idx.shape
        c = p["wte"].shape[1]
        x = p["wte"][idx] + p["wpe"][:t_len]
        for blk in p["h"]:
            q, k, v = lin(ln(x, blk["ln_1"]), blk["c_attn"]).split(c, dim=2)
            q, k, v = (a.view(b, t_len, n_head, c // n_head).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + lin(y.transpose(1, 2).contiguous().view(b, t_len, c), blk["attn_proj"])
            h = F.gelu(lin(ln(x, blk["ln_2"]), blk["c_fc"]), approximate="tanh")
            x = x + lin(h, blk["mlp_proj"])
        logits = ln(x, p["ln_f"]) @ p["wte"].T  # tied head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    tensors = [p["wte"], p["wpe"]] + [v for blk in p["h"] for sub in blk.values() for v in sub.values()]
    tensors += list(p["ln_f"].values())
    return loss_fn, tensors


def get_batch(ids, batch_size, block_size, rng):
    """tinyllm's `data.get_batch`: random windows and their next-token targets."""
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)
    offsets = np.arange(block_size)
    return ids[starts[:, None] + offsets], ids[starts[:, None] + offsets + 1]


def lr_at(it, lr, min_lr, warmup, decay_iters):
    """tinyllm's `optim.lr_at`: linear warm-up, then cosine decay to min_lr."""
    if it < warmup:
        return lr * (it + 1) / warmup
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="UTF-8 text file (tiny Shakespeare).")
    ap.add_argument("--max-iters", type=int, default=2000, help="Training steps (default 2000).")
    ap.add_argument("--seed", type=int, default=1337, help="Seed of weights and batches (default 1337).")
    ap.add_argument("--eval-interval", type=int, default=250, help="Evaluate every this many steps (default 250).")
    ap.add_argument("--eval-iters", type=int, default=20, help="Batches per split in an evaluation (default 20).")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0: torch's own choice).")
    ap.add_argument("--bias", action="store_true", help="Biases in linear layers and layer norms (default off).")
    args = ap.parse_args()
    import torch  # here, so that --help works without torch

    if args.threads:
        torch.set_num_threads(args.threads)
    block, batch, n_layer, n_head, n_embd = 64, 12, 4, 4, 128  # nanoGPT's CPU recipe
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([lookup[ch] for ch in text], dtype=np.int32)
    cut = int(len(ids) * 0.9)
    splits = {"train": ids[:cut], "val": ids[cut:]}

    rng = np.random.default_rng(args.seed)
    loss_fn, tensors = build_model(torch, init_params(rng, len(chars), block, n_layer, n_embd,
                                                      args.bias), n_head)
    decay = [p for p in tensors if p.ndim >= 2]
    no_decay = [p for p in tensors if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), eps=1e-8)

    def batch_of(split, generator):
        x, y = get_batch(splits[split], batch, block, generator)
        return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))

    def evaluate(it):
        eval_rng = np.random.default_rng([args.seed, it])
        out = {}
        with torch.no_grad():
            for split in ("train", "val"):
                batches = [batch_of(split, eval_rng) for _ in range(args.eval_iters)]
                out[split] = sum(float(loss_fn(x, y)) for x, y in batches) / args.eval_iters
        return out

    t0, c0 = time.perf_counter(), time.process_time()
    last = None
    for it in range(args.max_iters + 1):
        if it % args.eval_interval == 0 or it == args.max_iters:
            last = {"iter": it, **evaluate(it)}
            print(f"iter {it}: train {last['train']:.4f} val {last['val']:.4f}", file=sys.stderr)
        if it == args.max_iters:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it, 1e-3, 1e-4, 100, args.max_iters)
        x, y = batch_of("train", rng)
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tensors, 1.0)
        opt.step()
        float(loss.detach())  # as tinyllm's loop reads each step's loss
    print(json.dumps({"impl": "torch", "torch": torch.__version__, "iters": args.max_iters,
                      "seed": args.seed, "train_seconds": time.perf_counter() - t0,
                      "cpu_seconds": time.process_time() - c0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "params": sum(p.numel() for p in tensors),
                      "train_loss": last["train"], "val_loss": last["val"]}))


if __name__ == "__main__":
    main()
