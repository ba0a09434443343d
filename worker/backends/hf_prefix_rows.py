"""Which positions of a padded batch need their own logits row.

In a causal language model the logits at position ``p`` of a text depend only on its
ids ``0..p``. Texts that begin alike (a prompt template, a few-shot prefix, minimal
pairs, one text under several seeds) therefore share those rows, and the output
layer and log-softmax, which dominate the cost of scoring short texts with a large
vocabulary, need to run once per distinct prefix, not once per text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixRows:
    """The scored rows of a batch (positions ``0..n-2`` of each text of ``n`` ids, text
    after text) grouped by the prefix they end: ``row_of[r]`` is the distinct prefix
    row ``r`` ends, and ``positions[d]`` the first place distinct prefix ``d`` ends,
    as an index into the flattened ``[len(batch) * width]`` positions."""

    positions: torch.Tensor  # [distinct] long
    row_of: torch.Tensor  # [rows] long, in 0..distinct-1

    @property
    def distinct(self) -> int:
        return int(self.positions.shape[0])


def distinct_prefix_rows(batch: Sequence[Sequence[int]], width: int) -> PrefixRows:
    """:class:`PrefixRows` of ``batch`` right-padded to ``width``: a trie of the texts'
    ids, one node per distinct prefix, numbered in order of first appearance."""
    nodes: dict[tuple[int, int], int] = {}  # (parent node, next id) -> node
    positions: list[int] = []
    row_of: list[int] = []
    for text, ids in enumerate(batch):
        node = -1
        base = text * width
        for position in range(len(ids) - 1):
            key = (node, ids[position])
            found = nodes.get(key)
            if found is None:
                found = nodes[key] = len(positions)
                positions.append(base + position)
            row_of.append(found)
            node = found
    return PrefixRows(torch.tensor(positions, dtype=torch.long),
                      torch.tensor(row_of, dtype=torch.long))
