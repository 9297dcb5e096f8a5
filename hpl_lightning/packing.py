"""Shared-prefix (tree) packing: every distinct token prefix of a batch is computed once.

HPL data is a tree per task: the expert trajectory (the trunk) and every rejected continuation branching off it at
some step; the trajectory-, step- and group-level chosen continuations are pieces of the trunk when they come from
the same expert run. A per-pair forward recomputes the shared prefix for every sequence. Here the sequences of a
batch are inserted into a token trie (prefixes are found by comparing token ids, never from metadata such as
``task_id``, so a chosen continuation that differs from the recorded prefix simply becomes its own branch), and the
trie is laid out in pre-order in one row (or a few rows under a token budget). A token attends to its ancestors and
itself, and its position id is its depth: exactly what it sees, at exactly the positions, in its own sequence.

In pre-order the descendants of node ``j`` are the contiguous range ``[j, end[j])``, so the tree mask is
``allowed[q, k] = k <= q < end[k]``: the batch carries ``tree_end`` (one int per token) instead of a W x W mask, and
the same predicate is a FlexAttention ``mask_mod`` on GPU.

A token's log-prob is read from the hidden state at its parent node: only parents of scored tokens are projected onto
the vocabulary (:mod:`hpl_lightning.logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hpl_lightning.tokenization import TokenizedSequence


@dataclass(frozen=True)
class PackedBatch:
    """Packed rows plus the map from each sequence's scored tokens back to the packed hidden states.

    Unique scored tokens ``u``: log-prob of ``target_label[u]`` given the hidden state at flat (row-major) position
    ``target_parent[u]`` of the rows. Entries ``e`` (one per scored token of one sequence): sequence ``entry_seq[e]``
    counts unique token ``entry_target[e]``.
    """

    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W]
    tree_end: torch.Tensor  # [R, W]
    target_parent: torch.Tensor  # [U]
    target_label: torch.Tensor  # [U]
    entry_target: torch.Tensor  # [E]
    entry_seq: torch.Tensor  # [E]
    n_unique: int  # real (non-pad) tokens in the rows

    def as_dict(self) -> dict[str, torch.Tensor | int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_rows(seqs: Sequence[Sequence[int]], max_row_tokens: int | None) -> list[list[tuple[int, int]]]:
    """Rows of ``(sequence index, shared prefix length with the previous sequence of the row)``.

    Sequences are taken in lexicographic order of their token ids: then the trie of a row grows by
    ``len(s) - lcp(s, previous)`` per sequence (the longest prefix ``s`` shares with any earlier sequence is the one it
    shares with its predecessor). A row is closed when the next sequence would take it over ``max_row_tokens``.
    """
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    rows: list[list[tuple[int, int]]] = []
    size = 0
    for i in order:
        lcp = common_prefix(seqs[rows[-1][-1][0]], seqs[i]) if rows else 0
        grows = len(seqs[i]) - lcp
        if not rows or (max_row_tokens is not None and size + grows > max_row_tokens):
            rows.append([(i, 0)])
            size = len(seqs[i])
        else:
            rows[-1].append((i, lcp))
            size += grows
    return rows


def pack(seqs: Sequence[TokenizedSequence], pad_id: int, max_row_tokens: int | None = None) -> PackedBatch:
    """Packs ``seqs`` into token-trie rows (see the module docstring); sequence ``i`` keeps index ``i`` in entries."""
    ids = [s.input_ids for s in seqs]
    rows = plan_rows(ids, max_row_tokens)
    paths: list[tuple[int, torch.Tensor]] = [None] * len(seqs)  # (row, packed position of each token)
    row_tokens: list[list[int]] = []
    row_positions: list[list[int]] = []
    for r, row in enumerate(rows):
        tokens: list[int] = []
        positions: list[int] = []
        previous = torch.empty(0, dtype=torch.long)
        for i, lcp in row:
            n = len(ids[i])
            path = torch.cat([previous[:lcp], torch.arange(len(tokens), len(tokens) + n - lcp)])
            tokens.extend(ids[i][lcp:])
            positions.extend(range(lcp, n))
            paths[i], previous = (r, path), path
        row_tokens.append(tokens)
        row_positions.append(positions)

    width = max(len(t) for t in row_tokens)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    tree_end = torch.arange(1, width + 1).repeat(n_rows, 1)  # a pad attends to itself only (no empty softmax row)
    for r, (tokens, positions) in enumerate(zip(row_tokens, row_positions)):
        input_ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        position_ids[r, : len(positions)] = torch.tensor(positions, dtype=torch.long)

    # end[j] = 1 + the last node of any sequence through j (paths increase along a sequence, so that is its leaf)
    flat_end = tree_end.view(-1)
    nodes, ends, entry_node, entry_parent, entry_seq = [], [], [], [], []
    for i, (r, path) in enumerate(paths):
        global_path = r * width + path
        nodes.append(global_path)
        ends.append(torch.full_like(path, int(path[-1]) + 1))
        t = torch.nonzero(torch.tensor(seqs[i].scored[1:], dtype=torch.bool)).flatten() + 1
        entry_node.append(global_path[t])
        entry_parent.append(global_path[t - 1])
        entry_seq.append(torch.full_like(t, i))
    flat_end.scatter_reduce_(0, torch.cat(nodes), torch.cat(ends), reduce="amax")

    entry_node_t, entry_parent_t = torch.cat(entry_node), torch.cat(entry_parent)
    unique_nodes, entry_target = torch.unique(entry_node_t, return_inverse=True)
    parent_of = torch.empty_like(unique_nodes).scatter_(0, entry_target, entry_parent_t)  # one parent per node
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        tree_end=tree_end,
        target_parent=parent_of,
        target_label=input_ids.view(-1)[unique_nodes],
        entry_target=entry_target,
        entry_seq=torch.cat(entry_seq),
        n_unique=sum(len(t) for t in row_tokens),
    )


def tree_attention_mask(tree_end: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``[R, 1, W, W]`` mask ``allowed[q, k] = k <= q < end[k]``: boolean (SDPA), or additive in
    ``additive_dtype`` (0 where allowed, the dtype's minimum elsewhere) for the eager attention."""
    width = tree_end.shape[-1]
    pos = torch.arange(width, device=tree_end.device)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] < tree_end[:, None, :])
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=tree_end.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)


def tree_block_mask(tree_end: torch.Tensor):
    """The same mask as a FlexAttention ``BlockMask`` (block-sparse: attention to other branches is skipped), for
    ``attn_implementation='flex_attention'``."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return (k <= q) & (q < tree_end[b, k])

    rows, width = tree_end.shape
    return create_block_mask(mask_mod, rows, None, width, width, device=tree_end.device)


def packed_sequence_logps(
    token_logps: torch.Tensor, packed: dict[str, torch.Tensor], n_seqs: int, sum_dtype: torch.dtype = torch.float32
):
    """Summed log-prob and number of scored tokens per sequence from the log-prob of each unique scored token
    (``token_logps[u]``, see :class:`PackedBatch`); returns ``token_logps`` too."""
    entry_seq = packed["entry_seq"]
    logps = torch.zeros(n_seqs, dtype=sum_dtype, device=token_logps.device)
    logps = logps.index_add(0, entry_seq, token_logps[packed["entry_target"]].to(sum_dtype))
    n_tokens = torch.bincount(entry_seq, minlength=n_seqs)
    return logps, n_tokens, token_logps
