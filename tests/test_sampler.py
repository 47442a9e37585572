"""The loading side of issue 3: any mix of token-file formats in one sampler, and resident memory that stays flat."""

import os
import sys

import numpy as np
import pytest

from tokendata import BatchSampler, Dataset, OneBatchSampler, Shard, write_tokens


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_mixed_formats_in_one_sampler(tmp_path):
    """Our uint16 and uint32 shards and a headerless nanoGPT file, side by side: every window comes back intact and
    windows are drawn in proportion to each file's size."""
    write_tokens(str(tmp_path / "a.bin"), np.arange(1000) % 60000, np.dtype("<u2"))
    write_tokens(str(tmp_path / "b.bin"), 100_000 + np.arange(3000), np.dtype("<u4"))
    (np.arange(2000, dtype="<u2") + 60000).tofile(tmp_path / "c.bin")  # nanoGPT: raw uint16, no header
    shards = [Shard(str(tmp_path / f"{n}.bin")) for n in "abc"]
    assert [s.num_tokens for s in shards] == [1000, 3000, 2000]
    x, y = BatchSampler(shards, block_size=16, batch_size=6000, seed=0).next_batch()
    assert np.array_equal(x[:, 1:], y[:, :-1]) and np.all(np.diff(x, axis=1) == 1)  # consecutive, never mixed
    source = np.where(x[:, 0] >= 100_000, 1, np.where(x[:, 0] >= 60000, 2, 0))
    expected = np.array([984, 2984, 1984]) / 5952
    assert np.allclose(np.bincount(source, minlength=3) / len(source), expected, atol=0.02)


def test_llmc_shards_without_meta(tmp_path):
    """A folder of llm.c / modded-nanogpt shards (no meta.json) loads as a GPT-2 dataset."""
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"):
        write_tokens(str(tmp_path / name), np.arange(500) % 50257)
    data = Dataset(str(tmp_path))
    assert [os.path.basename(s.path) for s in data.shards("train")] == ["fineweb_train_000001.bin",
                                                                        "fineweb_train_000002.bin"]
    assert data.shards("val")[0].offset == 1024 and data.meta["vocab_size"] == 50257


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_resident_memory_flat_over_10000_batches(tmp_path):
    """
    64 MB of shards, 10,000 random batches: the sampler's resident memory does not grow, because it reads through a
    file handle (the page cache is not ours). The same windows read through a memmap grow RSS by most of the files,
    which shows the measurement can see the difference.
    """
    paths = []
    for i, (n, dtype) in enumerate(((12_000_000, "<u2"), (10_000_000, "<u4"))):
        paths.append(str(tmp_path / f"s{i}.bin"))
        write_tokens(paths[-1], np.arange(n, dtype=np.uint32) % 50000, np.dtype(dtype))
    shards = [Shard(p) for p in paths]
    sampler = BatchSampler(shards, block_size=256, batch_size=8, seed=0)
    for _ in range(500):
        sampler.next_batch()
    before = rss_mb()
    for _ in range(10_000):
        x, y = sampler.next_batch()
    grown = rss_mb() - before
    assert x.shape == (8, 256) and grown < 8, f"RSS grew {grown:.1f} MB over 10,000 batches"

    maps = [np.memmap(s.path, dtype=s.dtype, mode="r", offset=s.offset, shape=(s.num_tokens,)) for s in shards]
    rng = np.random.default_rng(0)
    before = rss_mb()
    for _ in range(10_000):
        for _ in range(8):
            m = maps[rng.integers(len(maps))]
            start = rng.integers(len(m) - 257)
            np.asarray(m[start:start + 257]).sum()
    assert rss_mb() - before > 30  # the memmap way: touched pages stay resident


def epochs_of_windows(world_size, batch_size, batches, shards, block_size):
    """The first token of every window the ranks of one launch read, in the order of the global batch, and the
    targets of each."""
    from tokendata import EpochSampler
    samplers = [EpochSampler(shards, block_size, batch_size, seed=[7, 0], rank=r, world_size=world_size)
                for r in range(world_size)]
    starts, targets = [], []
    for _ in range(batches):
        for sampler in samplers:
            x, y = sampler.next_batch()
            assert np.array_equal(x[:, 1:], y[:, :-1])
            starts += x[:, 0].tolist()
            targets += list(y)
    return starts, targets


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epochs_predict_every_token_once(tmp_path, world_size):
    """data_order=epochs: within each epoch the windows predict every token of every shard once (but a shard's first
    and the last few that make no whole window), the next epoch in another order, batches running on across the
    epoch's end; and the global batch is the same for any number of ranks sharing it."""
    from tokendata import EpochSampler
    sizes, block = [300, 521, 40], 16  # windows: 299 // 16 = 18, 520 // 16 = 32, 39 // 16 = 2; 52 in all
    for i, size in enumerate(sizes):  # ids are positions over all shards: a target says which token it is
        write_tokens(str(tmp_path / f"s{i}.bin"), sum(sizes[:i]) + np.arange(size), np.dtype("<u4"))
    shards = [Shard(str(tmp_path / f"s{i}.bin")) for i in range(len(sizes))]
    per_epoch = sorted(sum(sizes[:i]) + 1 + t for i, size in enumerate(sizes) for t in range((size - 1) // 16 * 16))
    batch_size = 6 // world_size
    starts, targets = epochs_of_windows(world_size, batch_size, 20, shards, block)  # 120 windows: 2.3 epochs
    for epoch in range(2):
        window_targets = targets[epoch * 52:(epoch + 1) * 52]
        assert sorted(np.concatenate(window_targets).tolist()) == per_epoch
    assert starts[:52] != starts[52:104] and sorted(starts[:52]) == sorted(starts[52:104])
    assert starts == epochs_of_windows(1, 6, 20, shards, block)[0]
    state = EpochSampler(shards, block, 6, seed=[7, 0])
    for _ in range(20):
        state.next_batch()
    assert EpochSampler.epochs_done(state.state_dict()) == pytest.approx(120 / 52)


def test_epochs_resume_where_they_stopped(tmp_path):
    """An epoch sampler's state carries it on exactly (within an epoch and across its end); with a dataset of another
    size it goes on at the same fraction of the epoch."""
    from tokendata import EpochSampler
    write_tokens(str(tmp_path / "a.bin"), np.arange(5000), np.dtype("<u2"))
    shards = [Shard(str(tmp_path / "a.bin"))]
    straight, resumed = EpochSampler(shards, 32, 10, seed=[1, 0]), None  # 156 windows: epoch 0 ends in batch 16
    for step in range(40):
        if step in (7, 15, 23):  # in epoch 0, at the batch that crosses into epoch 1, in epoch 1
            resumed = EpochSampler(shards, 32, 10, seed=[1, 0])
            resumed.load_state_dict(straight.state_dict())
        expected = straight.next_batch()[0]
        if resumed is not None:
            assert np.array_equal(resumed.next_batch()[0], expected)
    write_tokens(str(tmp_path / "b.bin"), np.arange(10_000), np.dtype("<u2"))
    bigger = EpochSampler([Shard(str(tmp_path / "b.bin"))], 32, 10, seed=[1, 0])  # 312 windows
    bigger.load_state_dict({"epoch": 2, "position": 39, "windows": 156})
    assert bigger.state_dict() == {"epoch": 2, "position": 78, "windows": 312}


def test_one_batch_is_the_first_random_batch_every_time(tmp_path):
    """data_order=one_batch: BatchSampler's first global batch at every step, each rank its slice of it, and what a
    step's consumer does to its arrays never reaches the next step's."""
    write_tokens(str(tmp_path / "a.bin"), np.arange(5000) % 60000, np.dtype("<u2"))
    shards = [Shard(str(tmp_path / "a.bin"))]
    first = BatchSampler(shards, block_size=16, batch_size=6, seed=[3, 0]).next_batch()
    ranks = [OneBatchSampler(shards, block_size=16, batch_size=3, seed=[3, 0], rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        batches = [sampler.next_batch() for sampler in ranks]
        for i in (0, 1):  # inputs, targets
            assert np.array_equal(np.concatenate([batch[i] for batch in batches]), first[i])
        batches[0][0][:] = -1
