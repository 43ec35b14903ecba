"""Pretraining data for the trainer: dataset construction and a resumable sampler.

The sampler's order depends only on (seed, epoch), and the trainer resumes it at the
exact sample where the checkpoint was written, so a resumed run sees the same batches
as an uninterrupted one. With several processes each rank takes every
``world_size``-th index of the same permutation.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinov.config import DataConfig
from dinov.data.datasets import UnlabelledImages


class SceneImages(Dataset):
    """Synthetic scenes rendered once into memory (images only; labels are for probes)."""

    def __init__(self, num_samples: int, image_size: int, seed: int) -> None:
        from dinov.data.synthetic import render_scenes

        self.images = render_scenes(num_samples, image_size, seed).images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class CountedSkips(Dataset):
    """Image files as ``(image, skipped)``: ``skipped`` is how many unreadable files were
    passed over to fill this sample (the reader replaces one by the next readable image).

    The count travels with the batch to the main process: counted in a DataLoader
    worker's copy of the reader, it would be lost.
    """

    def __init__(self, images: UnlabelledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        used, image = self.images._load_valid(index)
        return image, (used - index) % len(self.images)


def build_pretraining_dataset(cfg: DataConfig) -> Dataset:
    if cfg.kind == "synthetic":
        return SceneImages(cfg.num_samples, cfg.image_size, cfg.seed)
    if cfg.path is None:
        raise ValueError(f"data.path is required for data.kind={cfg.kind}")
    return CountedSkips(UnlabelledImages(cfg.path, cfg.image_size, layout=cfg.kind))


class ResumableSampler(Sampler[int]):
    """Epoch-seeded permutation, sharded by rank, that can start mid-epoch."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0
        self.start = 0  # index into this rank's shard where iteration begins

    def per_rank(self) -> int:
        return self.size // self.world_size

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=gen)
        shard = order[self.rank: self.per_rank() * self.world_size: self.world_size]
        return iter(shard[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank() - self.start


class BatchStream:
    """Endless batches (drop_last) with a position that maps to (epoch, sample offset).

    ``skipped_images`` counts the unreadable files this rank's batches passed over
    (:class:`CountedSkips`); the trainer logs it and keeps it in checkpoints.
    """

    def __init__(self, dataset: Dataset, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> None:
        self.dataset = dataset
        self.skipped_images = 0
        self.batch_size = cfg.batch_size
        self.num_workers = cfg.num_workers
        self.sampler = ResumableSampler(len(dataset), cfg.seed, rank, world_size)  # type: ignore[arg-type]
        self.batches_per_epoch = self.sampler.per_rank() // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"data: {len(dataset)} images over {world_size} process(es) give no full batch "  # type: ignore[arg-type]
                f"of data.batch_size={cfg.batch_size}")

    def iterate(self, start_batch: int) -> Iterator[torch.Tensor]:
        """Batches starting at global batch index ``start_batch`` (== the step to run)."""
        batch = start_batch
        while True:
            epoch, within = divmod(batch, self.batches_per_epoch)
            self.sampler.set_position(epoch, within * self.batch_size)
            # a private generator: creating a loader must not draw from the global RNG,
            # or a resumed run (new loader mid-epoch) would drift from an uninterrupted one
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                                num_workers=self.num_workers, drop_last=True,
                                persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                generator=torch.Generator().manual_seed(self.sampler.seed + epoch))
            for images in loader:
                if isinstance(images, (list, tuple)):  # CountedSkips: (images, skipped)
                    images, skipped = images
                    self.skipped_images += int(skipped.sum())
                yield images
                batch += 1
                if batch % self.batches_per_epoch == 0:
                    break
