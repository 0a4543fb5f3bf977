"""A distributed batch sampler whose position survives a checkpoint, even into a run with another world size."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of dataset indices (use as a DataLoader's batch_sampler).

    Each epoch has a fixed global order, a permutation from (seed, epoch). The order is cut into global batches of
    global_batch_size = micro_batch_size * world_size samples; rank r takes samples [r*mbs, (r+1)*mbs) of each. The
    last num_samples % global_batch_size samples of an epoch's order are dropped, so every rank yields the same number
    of batches (a collective never waits on a rank with nothing to do); the permutation differs per epoch, so
    different samples are dropped each time.

    consumed_samples counts the samples of the current epoch's order handed out, across all ranks; it advances by
    global_batch_size per yielded batch. After the last batch the sampler moves to the next epoch by itself.
    state_dict() / load_state_dict() carry (epoch, consumed_samples); a resume with the same global batch size at any
    world size continues with exactly the samples not yet consumed.

    Note: a DataLoader with workers draws batches ahead of use (prefetch), so this sampler's own count runs ahead of the
    training loop. Checkpoint the count of batches the loop actually consumed:
    {"epoch": epoch, "consumed_samples": steps_this_epoch * global_batch_size}, or use num_workers=0.
    """

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int, micro_batch_size: int,
                 consumed_samples: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = micro_batch_size * world_size
        if self.global_batch_size > num_samples:
            raise ValueError(f"global batch (micro_batch_size {micro_batch_size} x world_size {world_size}) exceeds "
                             f"num_samples {num_samples}: an epoch would have no batch")
        self.epoch = 0
        self.consumed_samples = 0
        self._set_consumed(consumed_samples)

    @property
    def samples_per_epoch(self) -> int:
        """Samples each epoch hands out (a whole number of global batches)."""
        return self.num_samples // self.global_batch_size * self.global_batch_size

    def _set_consumed(self, consumed_samples: int) -> None:
        if consumed_samples % self.global_batch_size or not 0 <= consumed_samples <= self.samples_per_epoch:
            raise ValueError(f"consumed_samples must be a multiple of the global batch size {self.global_batch_size} "
                             f"in [0, {self.samples_per_epoch}], got {consumed_samples}")
        self.consumed_samples = consumed_samples

    def set_epoch(self, epoch: int) -> None:
        """Moves to `epoch` from its start; a no-op if already in `epoch` (so a resumed position is kept)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed_samples = 0

    def global_order(self, epoch: int) -> np.ndarray:
        """(num_samples,) int64: the permutation of epoch `epoch`."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order(self.epoch)
        while self.consumed_samples < self.samples_per_epoch:
            start = self.consumed_samples + self.rank * self.micro_batch_size
            batch = order[start: start + self.micro_batch_size].tolist()
            self.consumed_samples += self.global_batch_size
            yield batch
        self.epoch += 1
        self.consumed_samples = 0

    def __len__(self) -> int:
        """Batches left in the current epoch for this rank."""
        return (self.samples_per_epoch - self.consumed_samples) // self.global_batch_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples, "num_samples": self.num_samples,
                "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Restores (epoch, consumed_samples); raises ValueError if the saved run used another dataset size, seed or
        global batch size (its position would name other samples)."""
        for key in ("num_samples", "seed", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler {getattr(self, key)}: "
                                 f"resuming would repeat or skip samples")
        self.epoch = int(state["epoch"])
        self._set_consumed(int(state["consumed_samples"]))
