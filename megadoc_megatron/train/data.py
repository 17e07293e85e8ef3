"""This rank's micro-batches of a blend's datasets (megadoc_megatron.blend.datasets).

Sample order follows Megatron-LM's pretraining sampler: the train stream is read in order from
`consumed_samples`; each run of `micro_batch_size * data_parallel_size` samples is one micro-batch
per data-parallel rank. Resuming therefore needs nothing but the number of samples consumed.
"""

from __future__ import annotations

import torch


class MicroBatchSampler(torch.utils.data.Sampler):
    """Indices of this data-parallel rank's micro-batches, from `start` to `end` samples."""

    def __init__(self, start: int, end: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int):
        self.start, self.end = start, end
        self.micro_batch_size, self.rank, self.size = micro_batch_size, data_parallel_rank, data_parallel_size

    def __iter__(self):
        stride = self.micro_batch_size * self.size
        for first in range(self.start, self.end - stride + 1, stride):
            begin = first + self.rank * self.micro_batch_size
            yield list(range(begin, begin + self.micro_batch_size))

    def __len__(self) -> int:
        return (self.end - self.start) // (self.micro_batch_size * self.size)


def micro_batches(dataset, start: int, end: int, micro_batch_size: int, num_workers: int = 0):
    """Iterator over this rank's micro-batches (dicts of tensors) of samples [start, end)."""
    from megatron.core import parallel_state

    sampler = MicroBatchSampler(start, end, micro_batch_size, parallel_state.get_data_parallel_rank(),
                                parallel_state.get_data_parallel_world_size())
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                            pin_memory=torch.cuda.is_available()))
