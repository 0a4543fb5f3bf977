"""ResumableSampler: one global order per epoch, cut the same way at any world size, resumable mid-epoch."""
import numpy as np
import pytest

from vilbert.data import ResumableSampler

NUM_SAMPLES = 103  # prime: an epoch leaves a remainder at every global batch size used here


def run(num_samples, seed, world_size, micro_batch_size, steps=None, state=None):
    """Global batches (rank slices concatenated in rank order) of up to `steps` steps, and the samplers' states."""
    samplers = [ResumableSampler(num_samples, seed, rank, world_size, micro_batch_size) for rank in range(world_size)]
    if state is not None:
        for sampler in samplers:
            sampler.load_state_dict(state)
    iterators = [iter(s) for s in samplers]
    batches = []
    for step, per_rank in enumerate(zip(*iterators)):
        assert all(len(b) == micro_batch_size for b in per_rank)
        batches.append([i for b in per_rank for i in b])
        if steps is not None and step + 1 == steps:
            break
    else:
        # zip stopped at rank 0's end; the other ranks must have no batch left either (and so finish the epoch).
        assert all(next(it, None) is None for it in iterators[1:])
    states = [s.state_dict() for s in samplers]
    assert all(s == states[0] for s in states)  # every rank counts the same global position
    return batches, states[0]


def test_one_and_two_ranks_see_the_same_global_batches():
    one, _ = run(NUM_SAMPLES, seed=3, world_size=1, micro_batch_size=8)
    two, _ = run(NUM_SAMPLES, seed=3, world_size=2, micro_batch_size=4)
    four, _ = run(NUM_SAMPLES, seed=3, world_size=4, micro_batch_size=2)
    assert one == two == four
    flat = [i for b in one for i in b]
    assert len(flat) == len(set(flat)) == NUM_SAMPLES // 8 * 8  # no repeats; the remainder of 7 is dropped
    order = ResumableSampler(NUM_SAMPLES, 3, 0, 1, 8).global_order(0)
    assert flat == order[: len(flat)].tolist()


@pytest.mark.parametrize("world_sizes", [(1, 1), (1, 2), (2, 1), (2, 4)])
def test_resume_mid_epoch_neither_repeats_nor_skips(world_sizes):
    global_batch = 8
    full, _ = run(NUM_SAMPLES, seed=5, world_size=1, micro_batch_size=global_batch)
    before_ws, after_ws = world_sizes
    head, state = run(NUM_SAMPLES, seed=5, world_size=before_ws, micro_batch_size=global_batch // before_ws, steps=5)
    assert state["epoch"] == 0 and state["consumed_samples"] == 5 * global_batch
    tail, end_state = run(NUM_SAMPLES, seed=5, world_size=after_ws, micro_batch_size=global_batch // after_ws,
                          state=state)
    assert head + tail == full
    assert end_state["epoch"] == 1 and end_state["consumed_samples"] == 0  # moved on to the next epoch


def test_epochs_differ_and_set_epoch_keeps_a_resumed_position():
    sampler = ResumableSampler(NUM_SAMPLES, seed=0, rank=1, world_size=2, micro_batch_size=5)
    assert len(sampler) == NUM_SAMPLES // 10
    epoch0 = list(sampler)
    assert sampler.epoch == 1 and len(sampler) == NUM_SAMPLES // 10
    sampler.set_epoch(1)  # no-op: already there
    epoch1 = list(sampler)
    assert epoch0 != epoch1 and sorted(map(tuple, epoch0)) != sorted(map(tuple, epoch1))
    sampler.load_state_dict({"epoch": 4, "consumed_samples": 30})
    assert len(sampler) == NUM_SAMPLES // 10 - 3
    sampler.set_epoch(4)
    assert sampler.consumed_samples == 30
    sampler.set_epoch(2)
    assert sampler.consumed_samples == 0
    different_seed = ResumableSampler(NUM_SAMPLES, seed=1, rank=1, world_size=2, micro_batch_size=5)
    assert list(different_seed) != epoch0


def test_bad_arguments_and_mismatched_states():
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, 0, rank=2, world_size=2, micro_batch_size=1)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        ResumableSampler(0, 0, rank=0, world_size=1, micro_batch_size=1)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        ResumableSampler(10, 0, rank=0, world_size=1, micro_batch_size=0)
    with pytest.raises(ValueError, match="exceeds num_samples"):
        ResumableSampler(10, 0, rank=0, world_size=4, micro_batch_size=3)
    with pytest.raises(ValueError, match="multiple of the global batch size 4"):
        ResumableSampler(100, 0, rank=0, world_size=2, micro_batch_size=2, consumed_samples=6)
    sampler = ResumableSampler(100, 0, rank=0, world_size=2, micro_batch_size=2)
    with pytest.raises(ValueError, match="global_batch_size=8"):
        sampler.load_state_dict({"epoch": 0, "consumed_samples": 8, "global_batch_size": 8})
    with pytest.raises(ValueError, match="num_samples=99"):
        sampler.load_state_dict({"epoch": 0, "consumed_samples": 8, "num_samples": 99})
    resumed = ResumableSampler(100, 0, rank=0, world_size=2, micro_batch_size=2, consumed_samples=96)
    assert len(resumed) == 1 and np.array_equal(list(resumed)[0], resumed.global_order(0)[96:98])
