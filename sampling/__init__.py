"""Family-independent sampling runs: label schedules, torchrun sharding, resumable shards, the final .npz."""
from .distributed import RankInfo, device_for_rank, rank_info_from_env, shard_for_rank
from .grid import save_grid
from .runner import GRID_NAME, NPZ_NAME, RunMismatchError, SamplingRun, run_sampling
from .schedule import LABEL_ORDERS, Batch, batch_seed, class_labels, make_batches
from .shards import CorruptShardError, assemble_npz, read_shard, shard_path, write_shard

__all__ = ['RankInfo', 'device_for_rank', 'rank_info_from_env', 'shard_for_rank', 'save_grid', 'GRID_NAME', 'NPZ_NAME',
           'RunMismatchError', 'SamplingRun', 'run_sampling', 'LABEL_ORDERS', 'Batch', 'batch_seed', 'class_labels',
           'make_batches', 'CorruptShardError', 'assemble_npz', 'read_shard', 'shard_path', 'write_shard']
