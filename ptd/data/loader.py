"""Batch iterators that hand the training loop normalized float batches already on the device.

``TensorLoader`` serves in-memory ``Split``s: the whole uint8 dataset is moved to the device once
(CIFAR-10 is 150 MB as uint8) and crop/flip augmentation runs on whole batches there, so small
images never go through PIL or worker processes. ``FolderLoader`` wraps a torch ``DataLoader``
for ``FolderSplit``s that do not fit in memory. Both shuffle deterministically per
(seed, epoch), identically on every rank before sharding.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ptd.data.base import DataError, FolderSplit, Split, to_rgb
from ptd.seeding import stream_seed

# (x, y), or (x, y, index) with ``with_index=True``: index (int64, on the device) is each
# sample's position in the split, for losses that keep per-sample state (CRD's memory bank).
Batch = tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------- batch ops
def crop_batch(x: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad ``x`` [B, C, H, W] by ``padding`` pixels and cut an HxW window per sample.

    ``offset_y``/``offset_x`` are int64 [B] in ``0..2*padding``; offset ``padding`` is the identity,
    offset 0 shifts content ``padding`` pixels down/right. Done with two gathers, no Python loop.
    """
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # zeros, [B, C, H+2p, W+2p]
    rows = offset_y.view(b, 1) + torch.arange(h, device=x.device).view(1, h)  # [B, H]
    cols = offset_x.view(b, 1) + torch.arange(w, device=x.device).view(1, w)  # [B, W]
    t = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * padding))
    return t.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def flip_batch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples of ``x`` [B, C, H, W] where the bool ``mask`` [B] is set."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def random_crop_flip(
    x: torch.Tensor, *, padding: int, hflip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop (per-sample offsets, zero padding) and random horizontal flip (p=0.5)."""
    b = x.shape[0]
    if padding > 0:
        oy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
        x = crop_batch(x, oy, ox, padding)
    if hflip:
        mask = torch.rand(b, device=x.device, generator=generator) < 0.5
        x = flip_batch(x, mask)
    return x


def _norm_consts(mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device):
    if len(mean) != channels or len(std) != channels:
        raise DataError(
            f"mean/std have {len(mean)}/{len(std)} values but the images have {channels} channels; "
            f"pass one value per channel"
        )
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    # (x/255 - mean)/std == x * scale + shift, two fused in-place ops per batch.
    return 1.0 / (255.0 * s), -m / s


def _size2(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def _finish(
    xb: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, size: tuple[int, int] | None, channels_last: bool
) -> torch.Tensor:
    x = xb.to(torch.float32).mul_(scale).add_(shift)
    if size is not None and tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _check_common(batch_size: int, rank: int, world_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}; fix the batch size in the config")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..{world_size - 1} (world_size={world_size}); check the launcher")


def _mix_seed(seed: int, epoch: int, rank: int) -> int:
    # Independent augmentation streams per (seed, epoch, rank), through a seed sequence (ptd.seeding).
    return stream_seed(seed, "augment", epoch=epoch, rank=rank)


def _order_seed(seed: int, epoch: int) -> int:
    # The shuffle of (seed, epoch): the same on every rank, independent across seeds and epochs
    # (seed + epoch would make seed s at epoch e replay seed s+1 at epoch e-1).
    return stream_seed(seed, "data_order", epoch=epoch)


# ----------------------------------------------------------------------------- in-memory
def real_samples(n: int, rank: int, world_size: int, train: bool, num_samples: int) -> int:
    """How many of this rank's ``num_samples`` are the split's own, not padding. A sharded eval
    loader (and DistributedSampler) pads the split to a multiple of world_size with repeats of its
    first samples, at the end of the order, so they are the tail of each rank's share: rank r
    holds positions r, r + world, ..., of which those below n are real. Training drops, never pads."""
    if train or world_size == 1:
        return num_samples
    return max(0, math.ceil((n - rank) / world_size))


class TensorLoader:
    """Iterates an in-memory ``Split`` from device memory; see ``make_loader`` for arguments."""

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        hflip: bool = True,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        image_size: int | Sequence[int] | None = None,
        with_index: bool = False,
    ):
        _check_common(batch_size, rank, world_size)
        self.with_index = with_index
        if crop_padding < 0:
            raise DataError(f"crop_padding must be >= 0 pixels, got {crop_padding}; fix the augmentation config")
        self.device = torch.device(device)
        # One host->device copy for the whole run; batches are then gathered on the device.
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.augment = augment
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        self.size = _size2(image_size)
        self.epoch = 0
        self._scale, self._shift = _norm_consts(mean, std, int(split.x.shape[1]), self.device)

        n = len(split)
        self.dataset_size = n
        if train:
            # drop_last: every rank gets n // world_size samples, then whole batches only.
            self._per_rank = n // world_size
            self._batches = self._per_rank // batch_size
            self.num_samples = self._batches * batch_size
            if n > 0 and self._batches == 0:
                raise DataError(
                    f"training split has {n} samples ({self._per_rank} per rank), fewer than batch_size={batch_size}; "
                    f"lower the batch size or raise data.train_subset"
                )
        else:
            # Eval keeps everything; with several ranks the tail is padded by repeating the start
            # so all ranks run the same number of batches (as DistributedSampler does).
            self._per_rank = math.ceil(n / world_size) if n else 0
            self._batches = math.ceil(self._per_rank / batch_size)
            self.num_samples = self._per_rank
        self.real_samples = real_samples(n, rank, world_size, train, self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentation stream for ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._batches

    def indices(self) -> torch.Tensor:
        """This rank's sample indices (CPU int64) for the current epoch, in iteration order."""
        n = self.dataset_size
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        total = self._per_rank * self.world_size
        if self.train:
            # Same generator seed on every rank, so all ranks agree on the order before sharding.
            g = torch.Generator().manual_seed(_order_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)[:total]
        else:
            order = torch.arange(n)
            if total > n:
                order = order.repeat(math.ceil(total / n))[:total]
        mine = order[self.rank :: self.world_size]
        if self.train:
            mine = mine[: self.num_samples]
        return mine

    def __iter__(self) -> Iterator[Batch]:
        idx = self.indices().to(self.device)
        gen = None
        if self.train and self.augment:
            gen = torch.Generator(device=self.device).manual_seed(_mix_seed(self.seed, self.epoch, self.rank))
        bs = self.batch_size
        for b in range(self._batches):
            bi = idx[b * bs : (b + 1) * bs]
            xb = self.x[bi]
            if gen is not None:
                xb = random_crop_flip(xb, padding=self.crop_padding, hflip=self.hflip, generator=gen)
            xb = _finish(xb, self._scale, self._shift, self.size, self.channels_last)
            yield (xb, self.y[bi], bi) if self.with_index else (xb, self.y[bi])


# ----------------------------------------------------------------------------- on disk
class _ImageFiles(Dataset):
    """(path, label) list -> (uint8 [3, S, S], label); decoding happens in DataLoader workers.

    With ``seed`` set (training), image i's random crop and flip in epoch e come from their own
    stream (seed, e, i), not from the process's global RNG: with workers they came from each
    worker's RNG (seeded per worker, dealt batches in turn), without workers from the training
    loop's own RNG, so the same run trained different weights at data.workers 0 and 2 (an
    audit: teacher files differed). Now the augmentation is a function of the image and epoch
    alone, whatever the number of workers or ranks, and the training RNG is left as it was."""

    def __init__(self, samples: list[tuple[str, int]], transform, seed: int | None = None):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.epoch = 0  # set by FolderLoader.set_epoch; workers get it when each epoch's iterator re-sends the dataset

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = to_rgb(im)
        except Exception as e:
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}; replace the file with a readable "
                            f"image and run the same command again to resume from the last finished epoch") from None
        if self.seed is None:
            return self.transform(img), label, i
        # The CPU generator alone (the transforms draw from it), put back after: torch.manual_seed would
        # also reseed every CUDA generator, and with workers 0 the GPU's dropout stream then followed
        # the batch's last image.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(stream_seed(self.seed, "augment_image", i, epoch=self.epoch))
            return self.transform(img), label, i


def folder_transform(image_size: int, *, train: bool, hflip: bool = True):
    """torchvision v2 pipeline to a uint8 tensor; normalization happens later on the device."""
    from torchvision.transforms import v2

    if train:
        ops = [v2.RandomResizedCrop(image_size, antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        # Resize the short side to 1.14x then center-crop: the standard 256 -> 224 eval recipe.
        ops = [v2.Resize(int(image_size * 1.14), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(ops + [v2.PILToTensor()])


class FolderLoader:
    """Iterates a ``FolderSplit`` through a torch DataLoader; same interface as ``TensorLoader``."""

    def __init__(
        self,
        split: FolderSplit,
        *,
        batch_size: int,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        seed: int = 0,
        augment: bool = True,
        hflip: bool = True,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 2,
        image_size: int | None = None,
        with_index: bool = False,
    ):
        _check_common(batch_size, rank, world_size)
        self.with_index = with_index
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.train = train
        self.channels_last = channels_last
        size = int(image_size if image_size is not None else split.image_size)
        self.dataset = _ImageFiles(split.samples, folder_transform(size, train=train and augment, hflip=hflip),
                                   seed=seed if train and augment else None)
        # DistributedSampler also serves world_size=1; set_epoch gives it the (seed, epoch) order seed.
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train
        )
        # Seeds the workers' base RNG (per epoch in set_epoch); augmentation no longer draws from it
        # (_ImageFiles seeds each image's own), so the weights do not depend on data.workers.
        self._gen = torch.Generator()
        self._scale, self._shift = _norm_consts(mean, std, 3, self.device)
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=train,
            generator=self._gen,
        )
        if train and len(split) > 0 and len(self.loader) == 0:
            raise DataError(
                f"training split has {len(split)} samples ({self.sampler.num_samples} per rank), fewer than "
                f"batch_size={batch_size}; lower the batch size or raise data.train_subset"
            )
        self.num_samples = len(self.loader) * batch_size if train else self.sampler.num_samples
        self.world_size = world_size  # evaluate sums a sharded loader's counts over the ranks by it
        self.real_samples = real_samples(len(split), rank, world_size, train, self.num_samples)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        # The sampler shuffles by its seed + its epoch: hand it the order seed and epoch 0.
        self.sampler.seed = _order_seed(self.seed, self.epoch)
        self.sampler.set_epoch(0)
        self._gen.manual_seed(_mix_seed(self.seed, self.epoch, self.rank))
        self.dataset.epoch = self.epoch  # the per-image augmentation streams of this epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        while True:
            try:
                xb, yb, ib = next(batches)
            except StopIteration:
                return
            except DataError as e:
                # A worker's DataError comes back re-raised with the worker's traceback folded into
                # its message; the user needs the original line (which file, what to do).
                raise DataError(_original_message(e)) from None
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            xb = _finish(xb, self._scale, self._shift, None, self.channels_last)
            yield (xb, yb, ib.to(self.device, non_blocking=True)) if self.with_index else (xb, yb)


def _original_message(e: DataError) -> str:
    """The message a DataLoader worker raised, without the "Caught ... in DataLoader worker"
    preamble and traceback that torch adds when it re-raises it in the main process."""
    text = str(e.args[0]) if e.args else str(e)
    if "DataLoader worker" not in text or "DataError: " not in text:
        return text
    return text.rsplit("DataError: ", 1)[1].strip()  # the traceback ends with "...DataError: <message>"


# ----------------------------------------------------------------------------- factory
def make_loader(
    split: Split | FolderSplit,
    *,
    batch_size: int,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
    seed: int = 0,
    augment: bool = True,
    crop_padding: int = 4,
    hflip: bool = True,
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    image_size: int | Sequence[int] | None = None,
    with_index: bool = False,
) -> TensorLoader | FolderLoader:
    """Build the loader for ``split``: batches (x float32 normalized NCHW, y int64) on ``device``.

    Train mode shuffles per (seed, epoch) (call ``set_epoch``), drops the last partial batch and
    augments; eval mode keeps order and every sample. With ``world_size > 1`` each rank gets a
    disjoint shard and all ranks get the same number of batches. ``crop_padding`` (pixels) only
    applies to in-memory splits; folder splits use RandomResizedCrop at ``image_size``.
    ``with_index``: batches are (x, y, index), index being the samples' positions in the split.
    """
    if isinstance(split, Split):
        return TensorLoader(
            split, batch_size=batch_size, train=train, mean=mean, std=std, device=device, seed=seed,
            augment=augment, crop_padding=crop_padding, hflip=hflip, channels_last=channels_last,
            rank=rank, world_size=world_size, image_size=image_size, with_index=with_index,
        )
    if isinstance(split, FolderSplit):
        if image_size is not None and not isinstance(image_size, int):
            h, w = image_size
            if h != w:
                raise DataError(f"folder datasets use square crops; got image_size={image_size}, pass one int")
            image_size = int(h)
        return FolderLoader(
            split, batch_size=batch_size, train=train, mean=mean, std=std, device=device, seed=seed,
            augment=augment, hflip=hflip, channels_last=channels_last, rank=rank,
            world_size=world_size, workers=workers, image_size=image_size, with_index=with_index,
        )
    raise DataError(f"make_loader got {type(split).__name__}, expected Split or FolderSplit; pass a split from load_dataset")
