"""Attention over tree-packed rows that computes only the (query, key) pairs the tree allows.

A packed preference row (``llava.data.collate``) is a tree of segments written one after the
other: ``prefix | image | question c_w | y_w | y_l | question c_l | y_w | y_l``. Each token sees
its own segment's earlier tokens and its ancestors'. Passed to SDPA as a dense mask, every pair of
the ``L x L`` square is computed, the masked-out ones between sibling branches included.

Here a row is cut into **chains**: maximal runs of consecutive tokens where each token sees exactly
what the one before it sees, plus itself (``prefix, image, c_w, y_w`` is one chain; ``y_l`` starts
a new one, whose keys are its ancestors ``prefix, image, c_w`` and itself). Each chain is one SDPA
call: its queries against its ancestors' keys and values (all visible) and its own (causal). That
is exactly the masked dense attention, computed without the masked-out pairs: no approximation,
any device, ordinary autograd (gradients reach the shared ancestors from every branch). A chain
with no ancestors runs with ``is_causal`` (the kernel skips the upper triangle); a token that sees
only itself (padding) gets its own value, which is what softmax over one key gives.

The chains are read off the boolean tree mask once per forward (``tree_layout``) and reach every
attention layer as the ``tree_layout`` keyword argument, which transformers' Llama passes through
to the attention function. Rows with the same layout (the two image rows of a record, usually)
run as one batch. Without a ``tree_layout`` the function is plain SDPA, so a model loaded with
this kernel runs SFT, the naive layout and generation as with ``sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TREE_SDPA = "sdpa_tree"


@dataclass(frozen=True)
class Chain:
    """Queries ``start:end`` attend to the key ranges ``ancestors`` (all of them) and to ``start:end`` causally.

    ``identity``: tokens that each see only themselves (padding), whose output is their own value.
    """

    start: int
    end: int
    ancestors: tuple[tuple[int, int], ...] = ()
    identity: bool = False

    @property
    def keys(self) -> tuple[tuple[int, int], ...]:
        """Ancestors and own tokens as few ranges as possible (a parent just before its child joins it)."""
        ranges = list(self.ancestors)
        if ranges and ranges[-1][1] == self.start:
            return tuple(ranges[:-1]) + ((ranges[-1][0], self.end),)
        return tuple(ranges) + ((self.start, self.end),)


@dataclass(frozen=True)
class TreeLayout:
    """The chains of each row, rows with the same chains grouped: ``groups[i] = (row indices, chains)``."""

    length: int
    groups: tuple[tuple[tuple[int, ...], tuple[Chain, ...]], ...]

    def pairs(self) -> int:
        """(query, key) pairs computed per head and layer, summed over rows (causal squares counted whole)."""
        total = 0
        for rows, chains in self.groups:
            for c in chains:
                q = c.end - c.start
                total += len(rows) * (q if c.identity else q * (q + sum(hi - lo for lo, hi in c.ancestors)))
        return total


def _ranges(indices: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted indices as half-open ranges: [0, 1, 2, 7, 8] -> ((0, 3), (7, 9))."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return tuple((lo, hi) for lo, hi in out)


def row_chains(mask: torch.Tensor) -> tuple[Chain, ...]:
    """The chains of one row's ``[L, L]`` boolean tree mask (True = may attend).

    Raises ``ValueError`` when the mask is not a tree mask (a chain's own tokens must come after all
    of its ancestors' and be seen causally), so a wrong layout can never be computed silently.
    """
    n = mask.shape[0]
    mask = mask.to(torch.bool)
    idx = torch.arange(1, n, device=mask.device)
    changed = mask[1:] ^ mask[:-1]
    # token i continues the chain of token i-1: its visible set is i-1's plus itself
    continues = (changed.sum(-1) == 1) & changed[idx - 1, idx] & mask[idx, idx]
    starts = [0] + (torch.nonzero(~continues).flatten() + 1).tolist()
    ends = starts[1:] + [n]
    chains: list[Chain] = []
    for s, e in zip(starts, ends):
        keys = torch.nonzero(mask[e - 1]).flatten().tolist()
        own = keys[len(keys) - (e - s):]
        if own != list(range(s, e)):
            raise ValueError(f"not a tree mask: tokens {s}..{e - 1} do not see themselves causally after their ancestors")
        ancestors = _ranges(keys[: len(keys) - (e - s)])
        if e - s == 1 and not ancestors:
            if chains and chains[-1].identity and chains[-1].end == s:
                chains[-1] = Chain(chains[-1].start, e, identity=True)
            else:
                chains.append(Chain(s, e, identity=True))
        else:
            chains.append(Chain(s, e, ancestors))
    return tuple(chains)


def tree_layout(mask: torch.Tensor) -> TreeLayout:
    """The layout of a batch's ``[R, L, L]`` (or ``[R, 1, L, L]``) boolean tree mask."""
    if mask.dim() == 4:
        mask = mask[:, 0]
    by_chains: dict[tuple[Chain, ...], list[int]] = {}
    for r in range(mask.shape[0]):
        by_chains.setdefault(row_chains(mask[r]), []).append(r)
    return TreeLayout(mask.shape[-1], tuple((tuple(rows), chains) for chains, rows in by_chains.items()))


def _keys(t: torch.Tensor, chain: Chain) -> torch.Tensor:
    """``t[:, :, ancestors + own]`` along the sequence: a view when the ranges are contiguous."""
    ranges = chain.keys
    if len(ranges) == 1:
        return t[:, :, ranges[0][0]: ranges[0][1]]
    return torch.cat([t[:, :, lo:hi] for lo, hi in ranges], dim=2)


def _chain_attention(q, k, v, chain: Chain, scale, dropout: float) -> torch.Tensor:
    if chain.identity:
        return v[:, :, chain.start: chain.end]
    queries = q[:, :, chain.start: chain.end]
    if not chain.ancestors:  # a root chain: plain causal attention over its own tokens
        own = slice(chain.start, chain.end)
        return F.scaled_dot_product_attention(queries, k[:, :, own], v[:, :, own], dropout_p=dropout, is_causal=True, scale=scale)
    n_q = chain.end - chain.start
    n_anc = sum(hi - lo for lo, hi in chain.ancestors)
    visible = torch.ones(n_q, n_anc + n_q, dtype=torch.bool, device=q.device)
    visible[:, n_anc:] = torch.ones(n_q, n_q, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(queries, _keys(k, chain), _keys(v, chain), attn_mask=visible, dropout_p=dropout,
                                          scale=scale)


def tree_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        tree_layout: TreeLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``[B, H, L, D]`` in, ``([B, L, H, D], None)`` out."""
    if tree_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[2] != tree_layout.length:
        raise ValueError(f"tree layout of length {tree_layout.length} for a sequence of {query.shape[2]} tokens")
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    outs, order = [], []
    for rows, chains in tree_layout.groups:
        if len(rows) == query.shape[0]:
            q, k, v = query, key, value
        else:
            pick = torch.tensor(rows, device=query.device)
            q, k, v = query.index_select(0, pick), key.index_select(0, pick), value.index_select(0, pick)
        outs.append(torch.cat([_chain_attention(q, k, v, c, scaling, dropout) for c in chains], dim=2))
        order += rows
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if order != sorted(order):
        out = out.index_select(0, torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=out.device))
    return out.transpose(1, 2).contiguous(), None


# Registered under its own name; ordinary (2-D) masks are built as for sdpa.
AttentionInterface.register(TREE_SDPA, tree_sdpa_attention)
AttentionMaskInterface.register(TREE_SDPA, sdpa_mask)
