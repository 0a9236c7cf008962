"""Token positions and token groups: how token-wise quantizers know which tokens they are seeing.

Static token-wise quantization (STWQ) keeps one (step, zero point) per group of sequence positions. The
positions of the tokens in the current forward are not visible from a layer's input alone (during KV-cache
decoding a layer sees one scale or one token at a time), so they are passed explicitly through a small
`TokenPositions` object shared by all quantizers of one model. The family adapter installs a hook that sets
it from the model's own state (for example the KV-cache length), and a caller may set it by hand.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


class TokenPositions:
    """The sequence positions of the tokens in the forward pass now running (shape [T], int64)."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self._pinned = False
        # group index of the current positions per (TokenGroups, device): every layer of one forward shares it
        self._group_cache: dict = {}

    def set(self, ids: torch.Tensor | range | Sequence[int]) -> None:
        """Set the positions, unless a caller pinned them with `at()`."""
        if self._pinned:
            return
        self.ids = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.long)

    def group_index(self, groups: "TokenGroups", num_tokens: int, device: torch.device,
                    dtype: torch.dtype = torch.long) -> torch.Tensor:
        """The group of every current token, on `device` ([T] of `dtype`); computed once per set of positions, so
        the layers of one forward pay for it once and never wait on a host-to-device copy."""
        ids = self.require(num_tokens)
        key = (groups, str(device), dtype)
        cached = self._group_cache.get(key)
        if cached is None or cached[0] is not ids:
            cached = (ids, groups.group_of(ids.to(device)).to(dtype))
            self._group_cache[key] = cached
        return cached[1]

    @contextmanager
    def at(self, ids: torch.Tensor | range | Sequence[int]) -> Iterator["TokenPositions"]:
        """Pin the positions for the duration of the block (hooks do not override them)."""
        previous, pinned = self.ids, self._pinned
        self._pinned = False
        self.set(ids)
        self._pinned = True
        try:
            yield self
        finally:
            self.ids, self._pinned = previous, pinned

    def require(self, num_tokens: int) -> torch.Tensor:
        if self.ids is None:
            raise RuntimeError(
                "a token-wise quantizer ran without token positions: the adapter's position hook did not "
                "fire (is its positions_module right?), or set them with `positions.at(range(...))`")
        if self.ids.numel() != num_tokens:
            raise RuntimeError(f"token positions hold {self.ids.numel()} entries but the layer sees "
                               f"{num_tokens} tokens: the position hook is out of step with the model")
        return self.ids


@dataclass(frozen=True)
class TokenGroups:
    """Contiguous position groups: group g covers positions [starts[g], starts[g+1]); the last is open-ended."""

    starts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.starts or self.starts[0] != 0:
            raise ValueError(f"token groups must start at position 0, got starts={self.starts}")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError(f"token group starts must increase strictly, got {self.starts}")

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "TokenGroups":
        """Groups of the given lengths, e.g. VAR's scales (1, 4, 9, ..., 256)."""
        starts, total = [], 0
        for size in sizes:
            starts.append(total)
            total += int(size)
        return cls(tuple(starts))

    @classmethod
    def sink_and_rest(cls, sink_tokens: int) -> "TokenGroups":
        return cls((0, sink_tokens)) if sink_tokens > 0 else cls((0,))

    @classmethod
    def per_position(cls, length: int) -> "TokenGroups":
        return cls(tuple(range(length)))

    @property
    def num_groups(self) -> int:
        return len(self.starts)

    def group_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Group index of every position (positions past the last start fall in the last group)."""
        if len(self.starts) > 16:
            starts = torch.tensor(self.starts, device=positions.device, dtype=positions.dtype)
            return torch.bucketize(positions, starts, right=True) - 1
        # few groups: compare with Python numbers, so no starts tensor is copied to the device (a synchronising copy)
        group = torch.zeros_like(positions)
        for start in self.starts[1:]:
            group += positions >= start
        return group
