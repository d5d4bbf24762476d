"""Batches for training: seeded (optionally length-grouped) samplers and the DataLoader (torch)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from romebert.runtime.encoding import Collator, EncodedDataset


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Mix seed and epoch so that (seed, epoch + 1) never replays (seed + 1, epoch).
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


class RandomEpochSampler(Sampler[int]):
    """A plain random permutation per epoch, deterministic for a given (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int = 42) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.num_samples, generator=_epoch_generator(self.seed, self.epoch)).tolist()


class LengthGroupedSampler(Sampler[int]):
    """Yields indices so that consecutive ``batch_size`` runs hold examples of similar length.

    Shuffle, cut into mega-batches of ``mega_batch_mult * batch_size``, sort each by length (descending),
    cut into batches and shuffle the batch order. Padding waste drops while batches stay random.
    Deterministic for a given (seed, epoch); call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 42,
        mega_batch_mult: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = _epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(len(self.lengths), generator=generator)
        mega = self.batch_size * max(1, self.mega_batch_mult)
        batches: list[torch.Tensor] = []
        for start in range(0, len(perm), mega):
            chunk = perm[start : start + mega]
            order = torch.argsort(self.lengths[chunk], descending=True, stable=True)
            batches.extend(chunk[order].split(self.batch_size))
        # Only the last batch can be short (mega is a multiple of batch_size). Keep it last: the
        # DataLoader regroups the flat index stream into batch_size runs, and a short batch in the
        # middle would shift every later run across two length groups.
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        for batch in shuffled + tail:
            yield from batch.tolist()


def make_dataloader(
    dataset: EncodedDataset,
    batch_size: int,
    collator: Collator,
    shuffle: bool,
    seed: int = 42,
    group_by_length: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over ``dataset``.

    ``shuffle=False`` (evaluation / prediction) keeps file order, so outputs map back to rows.
    ``shuffle=True`` uses a seeded sampler; call ``set_epoch(loader, epoch)`` at each epoch start.
    """
    sampler: Sampler[int]
    if not shuffle:
        sampler = SequentialSampler(dataset)
    elif group_by_length:
        sampler = LengthGroupedSampler(dataset.lengths, batch_size, seed=seed)
    else:
        sampler = RandomEpochSampler(len(dataset), seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        drop_last=False,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed a loader's shuffling sampler for ``epoch`` (no-op for sequential loaders)."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


class Prefetcher:
    """Collates the micro-batches of an epoch one or two ahead in a background thread (in pinned memory
    when training on a GPU, so the copy to the device need not block), in order.

    ``batches``: (this rank's indices, global batch size) per micro-batch, as the trainer cuts them;
    ``next()`` returns the collated batch of micro-batch ``start``, ``start + 1``, ... (None where this
    rank's share is empty)."""

    def __init__(self, collator, dataset, batches: Sequence, start: int, stop: int, device: torch.device) -> None:
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._pin = device.type == "cuda"

        def work() -> None:
            for indices, _ in batches[start:stop]:
                try:
                    item = collator([dataset[i] for i in indices]) if indices else None
                    if item is not None and self._pin:
                        item = {k: v.pin_memory() for k, v in item.items()}
                except BaseException as exc:  # handed to the training thread, which raises it
                    item = exc
                self._queue.put(item)

        self._thread = threading.Thread(target=work, name="romebert-prefetch", daemon=True)
        self._thread.start()

    def next(self) -> dict | None:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item
