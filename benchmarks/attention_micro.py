#!/usr/bin/env python
"""The packed rows' attention alone: dense tree mask vs ``sdpa_tree``'s chains, forward and backward.

    python benchmarks/attention_micro.py [--threads 1] [--context 100] [--image 576] [--reps 7]

One record's two image rows, shaped like the step benchmark's (prefix 28, image tokens, questions
c_w and c_l of ``--context`` tokens, answers 25 and 30), 4 heads of 64, fp32. Each repetition runs
every method once (round-robin); the minimum over repetitions is the least disturbed by other load.
``root+rest`` is a two-call alternative (the root chain causal, every later query against all keys
with the dense mask), printed for comparison. All three are checked equal first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tree_layout(context: int, image: int):
    """The two rows' ``TreeLayout`` (the segments of gpu_probes.py's packed row, as the collator lays them out)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_probes import layout_of

    return layout_of([28, image, context, 25, 30, context, 25, 30], rows=2)


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from llava.model.tree_attention import tree_sdpa_attention

    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--image", type=int, default=576)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    layout = tree_layout(a.context, a.image)
    mask, n = layout.dense(), layout.length
    q, k, v = (torch.randn(2, 4, n, 64, requires_grad=True) for _ in range(3))
    root = layout.groups[0][2][0].end
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    heads = torch.nn.Module()
    heads.num_key_value_groups = 1

    methods = {
        "dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive).transpose(1, 2),
        "sdpa_tree": lambda: tree_sdpa_attention(heads, q, k, v, None, tree_layout=layout)[0],
        "root+rest": lambda: torch.cat([
            F.scaled_dot_product_attention(q[:, :, :root], k[:, :, :root], v[:, :, :root], is_causal=True),
            F.scaled_dot_product_attention(q[:, :, root:], k, v, attn_mask=mask[:, :, root:])], 2).transpose(1, 2),
    }
    ref = methods["dense"]()
    for name, f in methods.items():
        assert (f() - ref).abs().max().item() < 1e-5, name
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(a.reps):
        for name, f in methods.items():
            t0 = time.perf_counter()
            f().sum().backward()
            times[name].append(time.perf_counter() - t0)
    print(f"{n} tokens per row (context {a.context}, image {a.image}), {a.threads} thread(s); pairs per head and layer: "
          f"dense {2 * n * n / 1e6:.2f}M, chains {layout.pairs() / 1e6:.2f}M (causal squares counted whole)")
    for name, t in times.items():
        print(f"  {name:<10} forward+backward min {1e3 * min(t):8.1f} ms   median {1e3 * sorted(t)[len(t) // 2]:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
