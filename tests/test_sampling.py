"""Family-independent sampling runs: schedule, sharding, atomic shards, resume, assembly."""
import json

import numpy as np
import pytest

import sampling.shards as shards
from sampling import (CorruptShardError, RankInfo, RunMismatchError, SamplingRun, batch_seed, class_labels,
                      make_batches, rank_info_from_env, read_shard, run_sampling, shard_for_rank, shard_path,
                      write_shard)


def fake_sampler(calls=None):
    """Deterministic stand-in for a model: each image encodes its label and the batch seed."""
    def sample(labels, seed):
        if calls is not None:
            calls.append((labels.tolist(), seed))
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = labels % 256
        return {'images': images, 'tokens': np.stack([labels, labels * 2], 1).astype(np.int16)}
    return sample


def test_interleaved_labels_make_every_prefix_class_balanced():
    labels = class_labels(per_class=3, classes=5)
    assert labels.tolist() == [0, 1, 2, 3, 4] * 3
    for n in range(5, len(labels) + 1):
        counts = np.bincount(labels[:n], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert class_labels(2, [7, 3], order='sorted').tolist() == [7, 7, 3, 3]
    assert class_labels(50).shape == (50_000,) and np.bincount(class_labels(50)).tolist() == [50] * 1000
    with pytest.raises(ValueError, match='unknown label order'):
        class_labels(1, 3, order='random')


def test_batches_and_seeds():
    batches = make_batches(np.arange(10), 4)
    assert [b.labels.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.start for b in batches] == [0, 4, 8] and [b.index for b in batches] == [0, 1, 2]
    seeds = {batch_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000                              # distinct per batch
    assert batch_seed(0, 5) == batch_seed(0, 5) != batch_seed(1, 5)


def test_rank_info_and_round_robin_sharding(monkeypatch):
    monkeypatch.setenv('RANK', '2')
    monkeypatch.setenv('WORLD_SIZE', '3')
    monkeypatch.setenv('LOCAL_RANK', '0')
    info = rank_info_from_env()
    assert info == RankInfo(2, 3, 0) and not info.is_main
    assert shard_for_rank(list(range(8)), info) == [2, 5]
    monkeypatch.setenv('RANK', '3')
    with pytest.raises(ValueError, match='outside'):
        rank_info_from_env()
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(var)
    assert rank_info_from_env() == RankInfo(0, 1, 0)


def test_shard_write_is_atomic(tmp_path, monkeypatch):
    path = shard_path(tmp_path, 3)
    write_shard(path, {'images': np.zeros((1, 2, 2, 3), np.uint8)})

    def crash(f, **arrays):
        f.write(b'partial')
        raise KeyboardInterrupt   # killed half-way through writing
    monkeypatch.setattr(shards.np, 'savez', crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(path, {'images': np.ones((1, 2, 2, 3), np.uint8)})
    assert read_shard(path)['images'].sum() == 0           # the old shard is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ['batch_000003.npz']   # no temporary file left


def test_corrupt_shard_is_a_clear_error(tmp_path):
    path = shard_path(tmp_path, 0)
    write_shard(path, {'images': np.zeros((2, 2, 2, 3), np.uint8), 'labels': np.zeros(2)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptShardError, match=r'batch_000000.npz is unreadable .* delete it and rerun'):
        read_shard(path)


def _run(tmp_path, name, **kw):
    return SamplingRun(out_dir=tmp_path / name, labels=class_labels(3, 5), batch_size=4, seed=7, grid_images=6, **kw)


def test_run_writes_npz_in_schedule_order(tmp_path):
    npz = run_sampling(fake_sampler(), _run(tmp_path, 'a'), rank=RankInfo(), progress=False)
    with np.load(npz) as z:
        assert sorted(z.files) == ['arr_0', 'labels', 'tokens']
        assert z['arr_0'].shape == (15, 4, 4, 3) and z['arr_0'].dtype == np.uint8
        assert z['labels'].tolist() == [0, 1, 2, 3, 4] * 3
        assert z['arr_0'][:, 0, 0, 0].tolist() == z['labels'].tolist()
        assert z['tokens'][:, 1].tolist() == [2 * l for l in z['labels']]
    assert (tmp_path / 'a' / 'grid.png').exists()
    assert len(list((tmp_path / 'a' / 'shards').glob('*.npz'))) == 4
    assert json.loads((tmp_path / 'a' / 'run.json').read_text())['num_images'] == 15


def test_interrupted_run_resumes_to_identical_bytes(tmp_path):
    reference = run_sampling(fake_sampler(), _run(tmp_path, 'ref'), rank=RankInfo(), progress=False).read_bytes()
    calls = []
    run = _run(tmp_path, 'resumed')
    assert run_sampling(fake_sampler(calls), run, rank=RankInfo(), max_new_batches=2, progress=False) is None
    assert not (run.out_dir / 'samples.npz').exists() and len(calls) == 2
    npz = run_sampling(fake_sampler(calls), run, rank=RankInfo(), progress=False)
    assert len(calls) == 4                                  # only the two missing batches were sampled
    assert npz.read_bytes() == reference
    # lose the result and some shards: rerunning regenerates exactly those
    npz.unlink()
    shard_path(run.out_dir / 'shards', 1).unlink()
    assert run_sampling(fake_sampler(calls), run, rank=RankInfo(), progress=False).read_bytes() == reference
    assert len(calls) == 5


def test_ranks_share_the_work_and_give_the_same_result(tmp_path):
    reference = run_sampling(fake_sampler(), _run(tmp_path, 'one'), rank=RankInfo(), progress=False).read_bytes()
    run = _run(tmp_path, 'two')
    calls = []
    assert run_sampling(fake_sampler(calls), run, rank=RankInfo(1, 2, 1), progress=False) is None
    assert [c[1] for c in calls] == [batch_seed(7, 1), batch_seed(7, 3)]     # batches 1 and 3, seeds by batch
    npz = run_sampling(fake_sampler(calls), run, rank=RankInfo(0, 2, 0), progress=False, wait_timeout_s=0)
    assert npz.read_bytes() == reference


def test_rank0_reports_missing_batches_of_other_ranks(tmp_path):
    with pytest.raises(TimeoutError, match=r'2 batches are still missing .* \(first: \[1, 3\]\)'):
        run_sampling(fake_sampler(), _run(tmp_path, 'x'), rank=RankInfo(0, 2, 0), progress=False,
                     wait_timeout_s=0, poll_s=0)


def test_official_reseeding_gives_every_batch_the_run_seed(tmp_path):
    calls = []
    run_sampling(fake_sampler(calls), _run(tmp_path, 'o', reseed_each_batch=True), rank=RankInfo(), progress=False)
    assert [c[1] for c in calls] == [7, 7, 7, 7]


def test_restart_with_other_settings_is_refused(tmp_path):
    run_sampling(fake_sampler(), _run(tmp_path, 'r'), rank=RankInfo(), max_new_batches=1, progress=False)
    other = _run(tmp_path, 'r')
    other.batch_size = 5
    with pytest.raises(RunMismatchError, match='batch_size: 4 recorded, 5 now'):
        run_sampling(fake_sampler(), other, rank=RankInfo(), progress=False)


def test_corrupt_shard_stops_a_restart_with_instructions(tmp_path):
    run = _run(tmp_path, 'c')
    run_sampling(fake_sampler(), run, rank=RankInfo(), max_new_batches=2, progress=False)
    bad = shard_path(run.out_dir / 'shards', 1)
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(CorruptShardError, match='batch_000001.npz is unreadable'):
        run_sampling(fake_sampler(), run, rank=RankInfo(), progress=False)


def test_sampler_output_is_validated(tmp_path):
    def wrong(labels, seed):
        return {'images': np.zeros((len(labels), 4, 4, 3), np.float32)}
    with pytest.raises(ValueError, match='uint8'):
        run_sampling(wrong, _run(tmp_path, 'w'), rank=RankInfo(), progress=False)
