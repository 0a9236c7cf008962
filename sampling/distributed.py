"""Rank and world size of a `torchrun` launch, read from the environment (single process when unset).

Sampling needs no collective communication: every rank writes its own shard files, and rank 0 assembles the
result once all shards exist. So no process group is created.
"""
import os
from dataclasses import dataclass
from typing import List, Sequence, TypeVar

T = TypeVar('T')


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info_from_env() -> RankInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun; (0, 1, 0) when absent."""
    try:
        info = RankInfo(int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)),
                        int(os.environ.get('LOCAL_RANK', 0)))
    except ValueError as err:
        raise ValueError(f'RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err})') from err
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f'RANK {info.rank} is outside [0, WORLD_SIZE={info.world_size})')
    return info


def shard_for_rank(items: Sequence[T], info: RankInfo) -> List[T]:
    """Round-robin share of `items` for this rank (batch i goes to rank i % world_size)."""
    return list(items[info.rank::info.world_size])


def device_for_rank(info: RankInfo) -> str:
    """'cuda:LOCAL_RANK' when CUDA is available, else 'cpu'."""
    import torch
    return f'cuda:{info.local_rank}' if torch.cuda.is_available() else 'cpu'
