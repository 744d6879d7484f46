"""Attention over tree-packed rows that computes only the (query, key) pairs the tree allows.

A packed preference row (``llava.data.collate``) is a tree of segments written one after the
other: ``prefix | image | question c_w | y_w | y_l | question c_l | y_w | y_l``. Each token sees
its own segment's earlier tokens and its ancestors'. Passed to SDPA as a dense mask, every pair of
the ``L x L`` square is computed, the masked-out ones between sibling branches included.

Here a row is cut into **chains**: maximal runs of consecutive segments where each segment is the
child of the one just before it (``prefix, image, c_w, y_w`` is one chain; ``y_l`` starts a new
one, whose keys are its ancestors ``prefix, image, c_w`` and itself). Each chain is one SDPA call:
its queries against its ancestors' keys and values (all visible) and its own (causal). That is
exactly the masked dense attention, computed without the masked-out pairs: no approximation, any
device, ordinary autograd (gradients reach the shared ancestors from every branch). A chain with
no ancestors runs with ``is_causal``; one with ancestors with ``causal_lower_right`` (its last
query sees every key), a mask form the flash and memory-efficient kernels take without a mask
tensor. A row's padding is one chain of tokens that each see only themselves: its output is its
own value, which is what softmax over one key gives.

The collator builds the layout (``row_chains``, ``TreeLayout.of_rows``) on the host, in the
DataLoader workers, from the segments it placed: no ``[L, L]`` mask is built for this kernel and
nothing is read back from the device. The layout is plain Python integers, so every slice the
kernel takes is known on the host: no device-to-host synchronisation in the forward. It reaches
every attention layer as the ``tree_layout`` keyword argument, which transformers' Llama passes
through to the attention function. Consecutive rows with the same chains (the two image rows of a
record, usually) run as one batch. Without a ``tree_layout`` the function is plain SDPA, so a
model loaded with this kernel runs SFT, the naive layout and generation as with ``sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
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
        return _joined(self.ancestors + ((self.start, self.end),))


def _joined(ranges: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted half-open ranges with touching neighbours joined: ((0, 3), (3, 5), (7, 9)) -> ((0, 5), (7, 9))."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def row_chains(segments: Sequence[tuple[int, int, int | None]], width: int) -> tuple[Chain, ...]:
    """The chains of one row from its segments ``(start, end, parent segment or None)``, written in row order.

    Segments must tile ``0..n`` and each parent must come before its child; ``n..width`` is padding
    (one identity chain). Raises ``ValueError`` otherwise, so a wrong layout is never computed.
    """
    chains: list[Chain] = []
    seen: list[tuple[tuple[int, int], ...]] = []  # per segment: the key ranges its tokens see (ancestors and itself)
    end = 0
    for i, (s, e, parent) in enumerate(segments):
        if s != end or e < s or (parent is not None and not 0 <= parent < i):
            raise ValueError(f"not a tree layout: segment {i} ({s}..{e}, parent {parent}) after a segment ending at {end}")
        above = seen[parent] if parent is not None else ()
        seen.append(_joined(above + ((s, e),)))
        end = e
        if s == e:
            continue
        # continues the chain of the segment just before it when that segment is its (non-empty) parent
        if chains and parent == i - 1 and segments[i - 1][0] < segments[i - 1][1]:
            chains[-1] = Chain(chains[-1].start, e, chains[-1].ancestors)
        else:
            chains.append(Chain(s, e, above))
    if width < end:
        raise ValueError(f"not a tree layout: {end} tokens in a row of width {width}")
    if width > end:
        chains.append(Chain(end, width, identity=True))
    return tuple(chains)


@dataclass(frozen=True)
class TreeLayout:
    """A batch's chains: ``groups[i] = (first row, end row, chains)``, consecutive rows with the same chains."""

    length: int
    groups: tuple[tuple[int, int, tuple[Chain, ...]], ...]

    @classmethod
    def of_rows(cls, rows: Sequence[tuple[Chain, ...]], length: int) -> TreeLayout:
        groups: list[tuple[int, int, tuple[Chain, ...]]] = []
        for r, chains in enumerate(rows):
            if groups and groups[-1][2] == chains:
                groups[-1] = (groups[-1][0], r + 1, chains)
            else:
                groups.append((r, r + 1, chains))
        return cls(length, tuple(groups))

    @property
    def rows(self) -> int:
        return self.groups[-1][1] if self.groups else 0

    def pairs(self) -> int:
        """(query, key) pairs computed per head and layer, summed over rows (causal squares counted whole)."""
        total = 0
        for first, end, chains in self.groups:
            for c in chains:
                q = c.end - c.start
                total += (end - first) * (q if c.identity else q * (q + sum(hi - lo for lo, hi in c.ancestors)))
        return total

    def dense(self, device=None) -> torch.Tensor:
        """The ``[R, 1, L, L]`` boolean mask the chains stand for (True = may attend): the dense reference kernels'
        input (``sdpa``/``eager``), never built for this kernel."""
        n = self.length
        out = torch.zeros(self.rows, 1, n, n, dtype=torch.bool)
        for first, end, chains in self.groups:
            for c in chains:
                n_c = c.end - c.start
                own = torch.eye(n_c, dtype=torch.bool) if c.identity else torch.ones(n_c, n_c, dtype=torch.bool).tril()
                out[first:end, 0, c.start:c.end, c.start:c.end] = own
                for lo, hi in c.ancestors:
                    out[first:end, 0, c.start:c.end, lo:hi] = True
        return out.to(device)


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
    keys, values = _keys(k, chain), _keys(v, chain)
    n_q, n_k = queries.shape[2], keys.shape[2]
    if queries.device.type == "cpu":
        # the CPU has no kernel for the lower-right form: causal_lower_right would materialise this same mask,
        # warning at every call that flash attention is unavailable
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=queries.device).tril(n_k - n_q)
    else:  # flash / memory-efficient attention take it as a mask type, no tensor
        mask = causal_lower_right(n_q, n_k)
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale)


def tree_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        tree_layout: TreeLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``[B, H, L, D]`` in, ``([B, L, H, D], None)`` out.

    With a ``tree_layout``, ``attention_mask`` is not read (``llava.model.forward`` passes a placeholder)."""
    if tree_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[2] != tree_layout.length or query.shape[0] != tree_layout.rows:
        raise ValueError(f"tree layout of {tree_layout.rows} rows of {tree_layout.length} tokens for "
                         f"{query.shape[0]} rows of {query.shape[2]}")
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    outs = []
    for first, end, chains in tree_layout.groups:
        q, k, v = query[first:end], key[first:end], value[first:end]
        outs.append(torch.cat([_chain_attention(q, k, v, c, scaling, dropout) for c in chains], dim=2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.transpose(1, 2).contiguous(), None


# Registered under its own name; ordinary (2-D) masks are built as for sdpa.
AttentionInterface.register(TREE_SDPA, tree_sdpa_attention)
AttentionMaskInterface.register(TREE_SDPA, sdpa_mask)
