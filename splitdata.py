"""Random access to the samples of a val/test split for the sweep, by sample index.

A split is decoded once and kept in memory as uint8 (``N x 3 x H x W`` images, ``N`` labels
or ``N x H x W`` masks); each batch becomes float on the fly, bit-identical to what the
dataset itself returns (its eval transform ends with ``ToFloat(max_value=255)``). A split
too large for the memory budget, or whose transform is not such a plain conversion, is
read from its dataset on every access instead, as a DataLoader would.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset


class SplitSource:
    """What the sweep needs from a split: its size, class labels and batches by index."""

    labels: list[int]
    in_memory: bool = True  # False when every access reads the dataset again

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, device: torch.device,
              memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] on ``device`` and their targets (int64) for ``index``."""
        raise NotImplementedError


# The 256 pixel values k/255 exactly as the dataset's ToFloat gives them. A CUDA division by a
# number multiplies by its reciprocal instead, which is one unit in the last place off for about
# half the grey levels; off the CPU the values are looked up here.
GREY_LEVELS = torch.arange(256, dtype=torch.float32) / 255


class InMemorySplit(SplitSource):
    """A split held as uint8 tensors (pinned when batches go to CUDA)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, labels: Sequence[int], pin: bool = False) -> None:
        self.images = images.pin_memory() if pin else images
        self.targets = targets.pin_memory() if pin else targets
        self.labels = list(labels)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.targets.numel() * self.targets.element_size()

    def batch(self, index, device, memory_format=torch.contiguous_format):
        images = self.images[index].to(device, non_blocking=True)
        if images.device.type == "cpu":
            images = images.float().div_(255)  # exact on the CPU, and faster than a lookup
        else:
            images = GREY_LEVELS.to(images.device)[images.long()]
        images = images.contiguous(memory_format=memory_format)
        return images, self.targets[index].to(device, non_blocking=True).long()


class TensorSplit(SplitSource):
    """A split given as float images in [0, 1] and targets (tests, notebooks, benchmarks)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, labels: Sequence[int] | None = None) -> None:
        self.images, self.targets = images, targets
        self.labels = list(labels) if labels is not None else (
            targets.tolist() if targets.dim() == 1 else [0] * len(targets))

    def batch(self, index, device, memory_format=torch.contiguous_format):
        return (self.images[index].to(device).contiguous(memory_format=memory_format),
                self.targets[index].to(device).long())


class DatasetSplit(SplitSource):
    """A split read from its dataset at every access (for splits too large to hold)."""

    in_memory = False

    def __init__(self, dataset: Dataset, workers: int = 0) -> None:
        self.dataset, self.workers = dataset, workers
        self.labels = list(dataset.labels)

    def batch(self, index, device, memory_format=torch.contiguous_format):
        if len(index) == 0:  # no examples to show, say: a DataLoader refuses a batch of none
            image, target = self.dataset[0]
            images, targets = image.new_empty((0, *image.shape)), torch.empty((0, *torch.as_tensor(target).shape))
            return images.to(device), targets.to(device).long()
        loader = DataLoader(Subset(self.dataset, index.tolist()), batch_size=len(index), num_workers=self.workers)
        images, targets = next(iter(loader))
        return (images.to(device).contiguous(memory_format=memory_format),
                torch.as_tensor(targets).to(device).long())


def split_bytes(n: int, image_size: int, task: str) -> int:
    """Memory an in-memory split of ``n`` square images takes (uint8 images, plus masks)."""
    per_image = 3 * image_size * image_size + (image_size * image_size if task == "segmentation" else 8)
    return n * per_image


def _as_uint8(images: torch.Tensor) -> torch.Tensor | None:
    """``images`` (float in [0, 1]) as uint8 if that is lossless, i.e. every value is k/255."""
    quantised = (images * 255).round().clamp(0, 255).to(torch.uint8)
    return quantised if torch.equal(quantised.float().div_(255), images) else None


def preload(dataset: Dataset, *, pin: bool = False, workers: int = 0, batch_size: int = 64) -> InMemorySplit | None:
    """Decode ``dataset`` once into an :class:`InMemorySplit`; None if it is not lossless."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    images, targets = [], []
    for batch_images, batch_targets in loader:
        quantised = _as_uint8(batch_images)
        if quantised is None:
            return None
        images.append(quantised)
        targets.append(torch.as_tensor(batch_targets).to(torch.uint8 if batch_targets.dim() > 1 else torch.int64))
    return InMemorySplit(torch.cat(images), torch.cat(targets), dataset.labels, pin=pin)


def load_split(dataset: Dataset, *, task: str, image_size: int, max_bytes: float, pin: bool = False,
               workers: int = 0) -> tuple[SplitSource, str | None]:
    """The split in memory when it fits ``max_bytes``, else read on demand; plus a note why not."""
    needed = split_bytes(len(dataset), image_size, task)
    if needed > max_bytes:
        return DatasetSplit(dataset, workers), (f"{needed / 2**30:.2f} GiB exceeds --max-memory "
                                                f"{max_bytes / 2**30:.2f} GiB: streaming it from disk")
    source = preload(dataset, pin=pin, workers=workers)
    if source is None:
        return DatasetSplit(dataset, workers), "its transform is not a plain uint8 conversion: streaming it"
    return source, None


class SubsetSplit(SplitSource):
    """The samples ``indices`` of another split (e.g. the checklist's stratified subset)."""

    def __init__(self, source: SplitSource, indices: Sequence[int]) -> None:
        self.source, self.in_memory = source, source.in_memory
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.labels = [source.labels[i] for i in self.indices.tolist()]

    def batch(self, index, device, memory_format=torch.contiguous_format):
        return self.source.batch(self.indices[index], device, memory_format)
