"""
Paired SAR/optical data: finding the files, pairing them, loading and batching.

Pairing never relies on position alone (docs/design.md, section 2): a SAR file and
its optical partner share their relative path (only the extension may
differ), or their paths differ by the SEN1-2 ``s1`` -> ``s2`` substitution.
Every user-caused problem is a :class:`DataError` with a one-line message.

Batches are cut from one global order per epoch that depends only on the seed
and the epoch, and every rank takes its own block of each global batch, so a
run on W ranks at batch B sees exactly the data of one process at batch B * W.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch as th

from . import logger
from .base.image_files import (  # noqa: F401 (natural_key orders find_pairs' names)
    IMAGE_EXTENSIONS,
    list_images,
    natural_key,
)
from .io.rasters import (  # noqa: F401 (DataError is part of this module's interface)
    DataError,
    Scaling,
    load_opt_patch,
    load_sar_patch,
    read_raster,
)

# guided-diffusion's random crop covers between 80% and 100% of the short side
_MIN_CROP_FRAC = 0.8

# A SEN1-2 / SEN12MS sensor token: "s1" as a whole word of a folder or file name,
# so that "ROIs1158" is left alone while "s1_1/", "_s1_1_p30" and SEN12MS-CR's
# "ROIs1158_spring_s1/" are matched.
_S1_TOKEN = re.compile(r"(?:^|(?<=[/_]))s1(?=[_/.]|$)")

# The other products of SEN12MS (land cover, lc_1/) and SEN12MS-CR (cloudy
# Sentinel-2, s2_cloudy_1/) that share a root with s1/ and s2/: left out.
_OTHER_PRODUCTS = re.compile(r"(?:^|(?<=[/_]))(lc|s2_cloudy)(?=[_/.]|$)")

_CONVENTIONS = (
    "pair files by the same relative path (sar/12.png <-> opt/12.png, only the "
    "extension may differ) or by the SEN1-2 s1 -> s2 substitution "
    "(ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.png <-> "
    "ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.png)"
)


def _list_images(folder: str, what: str) -> list[str]:
    """The images under ``folder`` (image_files.list_images); none is an error."""
    if not os.path.isdir(folder):
        raise DataError(
            f"{what} folder {folder} does not exist or is not a folder; check the path"
        )
    names = list_images(folder)
    if not names:
        raise DataError(
            f"{what} folder {folder} holds no images (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}); check the path"
        )
    return names


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _match(sar_names, opt_names, dir_sar, dir_opt):
    """
    Pair SAR names with optical names by the two conventions.

    :return: (pairs as (sar_name, opt_name), unpaired paths).
    """
    opt_set = set(opt_names)
    opt_by_stem, sar_by_stem = {}, {}
    for n in opt_names:
        opt_by_stem.setdefault(_stem(n), []).append(n)
    for n in sar_names:
        sar_by_stem.setdefault(_stem(n), []).append(n)

    def partner(name, candidate):
        if candidate in opt_set:
            return candidate
        found = opt_by_stem.get(_stem(candidate), [])
        if not found:
            return None
        # an extension-only match must be unique on both sides, otherwise
        # which file belongs to which is a guess
        rivals = sar_by_stem[_stem(name)]
        if len(found) > 1 or len(rivals) > 1:
            raise DataError(
                f"cannot tell which files pair up: SAR "
                f"{', '.join(os.path.join(dir_sar, r) for r in rivals)} and optical "
                f"{', '.join(os.path.join(dir_opt, f) for f in found)} differ only in "
                f"their extension; keep one file per name on each side"
            )
        return found[0]

    pairs, owner, unpaired = [], {}, []
    for name in sar_names:
        opt = partner(name, name)
        if opt is None:
            opt = partner(name, _S1_TOKEN.sub("s2", name))
        if opt is None:
            unpaired.append(os.path.join(dir_sar, name))
            continue
        if opt in owner:
            raise DataError(
                f"{os.path.join(dir_opt, opt)} is the optical partner of both "
                f"{os.path.join(dir_sar, owner[opt])} and "
                f"{os.path.join(dir_sar, name)}; rename or remove one of them"
            )
        owner[opt] = name
        pairs.append((name, opt))
    unpaired += [os.path.join(dir_opt, n) for n in opt_names if n not in owner]
    return pairs, unpaired


def _unpaired_error(unpaired: list[str]) -> DataError:
    first, others = unpaired[0], unpaired[1:]
    shown = ", ".join(others[:4])
    if len(others) > 4:
        shown += f", and {len(others) - 4} more"
    files = "file" if len(others) == 1 else "files"
    count = f" (and {len(others)} other unpaired {files}: {shown})" if others else ""
    return DataError(f"{first} has no partner{count}; {_CONVENTIONS}")


def find_pairs(dir_sar: str, dir_opt: str, notes=None) -> list[tuple[str, str, str]]:
    """
    Find the SAR/optical pairs of two folders (or of one SEN1-2 root given twice).

    Partners share their path relative to their folder (only the extension may
    differ, when that leaves exactly one candidate) or differ by the SEN1-2
    substitution of the ``s1`` token with ``s2`` in folder and file names.
    When both folders are the same, SAR files are those with an ``s1`` token
    in their path and optical files those with ``s2``.

    :param dir_sar: folder of SAR images (searched recursively).
    :param dir_opt: folder of optical images (searched recursively).
    :param notes: a list to append what was left out to; None to log it.
    :return: [(sar_path, opt_path, name)] sorted by :func:`natural_key` of name,
        where name is the SAR file's path relative to ``dir_sar`` ("/" separators).
    :raises DataError: a folder is missing or empty, a file has no partner, or
        the pairing is ambiguous.
    """
    sar_names = _list_images(dir_sar, "SAR")
    if os.path.realpath(dir_sar) == os.path.realpath(dir_opt):
        # files without an s1 token are optical candidates; one without an
        # s2 token then finds no SAR partner and is reported as unpaired
        others = [n for n in sar_names if _OTHER_PRODUCTS.search(n)]
        left_out = set(others)
        opt_names = [
            n for n in sar_names if not _S1_TOKEN.search(n) and n not in left_out
        ]
        sar_names = [n for n in sar_names if _S1_TOKEN.search(n)]
        if others:
            kinds = sorted({_OTHER_PRODUCTS.search(n).group(1) for n in others})
            note = (
                f"{dir_sar}: left out {len(others)} file(s) of other products "
                f"({', '.join(k + '_*' for k in kinds)}, e.g. {others[0]}); pairing "
                "s1 with s2"
            )
            if notes is None:
                logger.log(note)
            else:
                notes.append(note)
        if not sar_names:
            raise DataError(
                f"the SAR and optical folders are both {dir_sar}, but no path in it "
                f"has a SEN1-2 's1' token; give separate folders (--data_dir_sar, "
                f"--data_dir_opt) or a SEN1-2 root"
            )
    else:
        opt_names = _list_images(dir_opt, "optical")
    pairs, unpaired = _match(sar_names, opt_names, dir_sar, dir_opt)
    if unpaired:
        raise _unpaired_error(unpaired)
    return [
        (os.path.join(dir_sar, s), os.path.join(dir_opt, o), s)
        for s, o in pairs  # in the natural order of the SAR names
    ]


def find_test_pairs(data_dir: str) -> list[tuple[str, str | None, str]]:
    """
    Find the sampling inputs: ``data_dir/sar`` and optional ground truth ``opt/``.

    :param data_dir: folder holding ``sar/`` and optionally ``opt/``.
    :return: [(sar_path, opt_path or None, name)] sorted by :func:`natural_key` of name,
        the SAR file's path relative to ``data_dir/sar``. With ``opt/`` present
        every file must have a partner, as in :func:`find_pairs`.
    :raises DataError: ``sar/`` is missing or empty, or the pairing fails.
    """
    dir_sar = os.path.join(data_dir, "sar")
    dir_opt = os.path.join(data_dir, "opt")
    if not os.path.isdir(dir_sar):
        raise DataError(
            f"{dir_sar} does not exist; put the SAR test images in {dir_sar} "
            f"and their optical ground truth (optional) in {dir_opt}"
        )
    if os.path.isdir(dir_opt):
        return find_pairs(dir_sar, dir_opt)
    return [(os.path.join(dir_sar, n), None, n) for n in _list_images(dir_sar, "SAR")]


def load_sar(
    path, image_size, sar_channels=3, crop=None, flip=False, *, scaling=None
) -> np.ndarray:
    """
    Load a SAR image for the model (rasters.py tells how each kind is read).

    :param path: image file: 8-bit grey or RGB (mode L, LA, RGB or P), or a
        (Geo)TIFF / 16-bit PNG read as ``scaling`` says.
    :param image_size: side of the square output.
    :param sar_channels: 3 (single-band SAR replicated, RGB kept) or 1 (RGB
        converted to L), for 8-bit images when no ``scaling`` is given.
    :param crop: None for a center crop after resizing the short side to
        ``image_size``; or (short_side, y, x): resize the short side to
        ``short_side`` and place the crop window at the relative offsets
        y, x in [0, 1) of the remaining room.
    :param flip: mirror left-right after cropping.
    :param scaling: a :class:`rasters.Scaling` (its sar_channels wins).
    :return: float32 array (sar_channels, image_size, image_size) in [-1, 1];
        nodata pixels hold -1 (:func:`rasters.load_sar_patch` returns the mask).
    :raises DataError: the file cannot be read or does not fit the scaling.
    """
    scaling = scaling or Scaling(sar_channels=sar_channels)
    return load_sar_patch(path, image_size, scaling, crop, flip)[0]


def load_opt(path, image_size, crop=None, flip=False, *, scaling=None) -> np.ndarray:
    """
    Load an optical image as RGB (RGBA, P and L are converted).

    :param path: image file: 8-bit RGB, or bands picked and scaled by ``scaling``
        (``opt_bands``, ``opt_range``).
    :param image_size: side of the square output.
    :param crop: as in :func:`load_sar`.
    :param flip: mirror left-right after cropping.
    :param scaling: a :class:`rasters.Scaling`, or None for 8-bit RGB.
    :return: float32 array (3, image_size, image_size) in [-1, 1].
    :raises DataError: the file cannot be read or does not fit the scaling.
    """
    return load_opt_patch(path, image_size, scaling, crop, flip)


class PairedDataset(th.utils.data.Dataset):
    """
    SAR/optical pairs, augmented identically on both sides.

    :param pairs: [(sar_path, opt_path, name)] as returned by :func:`find_pairs`.
    :param image_size: side of the square crops.
    :param sar_channels: 1 or 3, for 8-bit images when no ``scaling`` is given.
    :param random_crop: crop at a random scale and place instead of the center.
    :param random_flip: mirror left-right with probability 1/2.
    :param scaling: a :class:`rasters.Scaling` (its sar_channels wins).
    """

    def __init__(
        self,
        pairs,
        image_size,
        sar_channels=3,
        random_crop=False,
        random_flip=False,
        *,
        scaling=None,
    ):
        super().__init__()
        self.pairs = pairs
        self.image_size = image_size
        self.scaling = scaling or Scaling(sar_channels=sar_channels)
        self.sar_channels = self.scaling.sar_channels
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, item):
        """
        :param item: (index, aug_seed); aug_seed alone decides the crop and flip.
        :return: float32 array (sar_channels + 3, H, W), SAR channels first.
        """
        return self.sample(*item)[0]

    def sample(self, index, aug_seed):
        """:return: (the array of ``self[index, aug_seed]``, the SAR's rasters.SarStats)."""
        sar_path, opt_path, _ = self.pairs[index]
        sar, opt = read_raster(sar_path), read_raster(opt_path)
        if sar.size != opt.size:
            raise DataError(
                f"SAR image {sar_path} ({sar.size[0]}x{sar.size[1]}) and its optical "
                f"partner {opt_path} ({opt.size[0]}x{opt.size[1]}) differ in size; "
                f"resample them to a common grid so their pixels line up"
            )
        rng = np.random.default_rng(aug_seed)
        crop = None
        if self.random_crop:
            max_side = math.ceil(self.image_size / _MIN_CROP_FRAC)
            short_side = int(rng.integers(self.image_size, max_side + 1))
            crop = (short_side, rng.random(), rng.random())
        flip = self.random_flip and rng.random() < 0.5
        size, scaling = self.image_size, self.scaling
        sar_arr, _, stats = load_sar_patch(sar_path, size, scaling, crop, flip, sar)
        opt_arr = load_opt_patch(opt_path, size, scaling, crop, flip, opt)
        return np.concatenate([sar_arr, opt_arr]), stats


def _aug_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class GlobalBatchSampler:
    """
    Infinite batches of (index, aug_seed), one rank's block of each global batch.

    Global batch k (from ``start_batch`` on) is positions j*GB .. (j+1)*GB of
    epoch e's order, with GB = batch_size * world_size, e = k // (N // GB),
    j = k % (N // GB); the tail of each epoch that fills no global batch is
    dropped. The order is arange(N) when deterministic, else
    ``np.random.default_rng([seed, e]).permutation(N)``; the aug_seed of a
    position depends on (seed, e, position) only. What a rank sees is thus
    independent of the number of workers and of where a run resumed.

    :param num_items: N, the dataset size.
    :param batch_size: items per batch on this rank.
    :param rank: this rank's block within the global batch.
    :param world_size: number of ranks.
    :param deterministic: keep the dataset order instead of shuffling each epoch.
    :param seed: non-negative seed of the orders and augmentations.
    :param start_batch: global batch number to start from (resume).
    """

    def __init__(
        self,
        num_items,
        batch_size,
        *,
        rank=0,
        world_size=1,
        deterministic=False,
        seed=0,
        start_batch=0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if not 0 < batch_size * world_size <= num_items:
            raise ValueError(
                f"{num_items} items do not fill one global batch of "
                f"{batch_size} x {world_size} ranks"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.deterministic = deterministic
        self.seed = seed
        self.start_batch = start_batch

    def _order(self, epoch):
        if self.deterministic:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        batches_per_epoch = self.num_items // global_batch
        k, epoch, order = self.start_batch, None, None
        while True:
            e, j = divmod(k, batches_per_epoch)
            if e != epoch:
                epoch, order = e, self._order(e)
            start = j * global_batch + self.rank * self.batch_size
            yield [
                (int(order[p]), _aug_seed(self.seed, e, p))
                for p in range(start, start + self.batch_size)
            ]
            k += 1


class _Samples(th.utils.data.Dataset):
    """
    The samples of a batch, with what scaling met, and DataErrors returned, not
    raised (a worker would re-raise a long traceback).

    A pair whose SAR window holds no valid pixel is skipped for the next pair in
    the dataset's order (the same whatever the workers), and named.
    """

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, aug_seed = item
        skipped = []
        try:
            for k in range(len(self.dataset)):
                array, stats = self.dataset.sample((index + k) % len(self), aug_seed)
                if not stats.all_nodata:
                    return array, stats, skipped
                skipped.append(stats.path)
        except DataError as exc:
            return exc
        return DataError(
            f"every SAR image of the training data is nodata in its window (e.g. "
            f"{skipped[0]}); check --sar_nodata and --sar_input (dB values read as "
            f"power or amplitude are negative, so never valid)"
        )


def _collate(samples):
    for s in samples:
        if isinstance(s, DataError):
            return s
    arrays, stats, skipped = zip(*samples)
    return (
        th.from_numpy(np.stack(arrays)),
        list(stats),
        [p for group in skipped for p in group],
    )


class _DataReport:
    """
    Tells the log what scaling met: skipped all-nodata patches (each), filled
    nodata pixels (the first time, then at 10, 100, ... patches), and one warning
    when an image clips at one end of its dB range.
    """

    def __init__(self):
        self.skipped = 0
        self.patches_with_nodata = 0
        self.nodata_pixels = 0
        self.next_report = 10
        self.warned = False

    def add(self, stats, skipped):
        for path in skipped:
            self.skipped += 1
            logger.log(
                f"skipped {path}: no valid SAR pixel in its window "
                f"({self.skipped} all-nodata patch(es) skipped so far)"
            )
        for st in stats:
            if st.nodata:
                self.patches_with_nodata += 1
                self.nodata_pixels += st.nodata
                if self.patches_with_nodata == 1:
                    logger.log(
                        f"{st.path}: {st.nodata} of {st.pixels} SAR pixels are nodata; "
                        "nodata pixels are filled with the bottom of the dB range (-1)"
                    )
                elif self.patches_with_nodata == self.next_report:
                    self.next_report *= 10
                    logger.log(
                        f"{self.patches_with_nodata} patches so far had nodata pixels "
                        f"({self.nodata_pixels} filled with -1)"
                    )
            warning = None if self.warned else st.clipping_warning()
            if warning:
                self.warned = True
                logger.warn(warning)


def load_data(
    *,
    data_dir_sar,
    data_dir_opt,
    batch_size,
    image_size,
    deterministic=False,
    random_crop=False,
    random_flip=False,
    sar_channels=3,
    scaling=None,
    seed=0,
    start_batch=0,
    num_workers=None,
    rank=None,
    world_size=None,
    pairs=None,
):
    """
    Pair the two folders and return an endless iterator of training batches.

    The files are found and paired here, so data errors surface before
    training starts; unreadable images surface (as :class:`DataError`) when
    their batch is reached. All-nodata patches are skipped and named in the
    log, as are filled nodata pixels and images that clip at their dB range.

    :param data_dir_sar: SAR folder (--data_dir_sar).
    :param data_dir_opt: optical folder (--data_dir_opt); equal to data_dir_sar
        for a SEN1-2 / SEN12MS root holding both.
    :param batch_size: images per batch on this rank.
    :param image_size: side of the square crops.
    :param deterministic: keep the file order instead of shuffling each epoch.
    :param random_crop: random scale and position of the crop.
    :param random_flip: random left-right mirror.
    :param sar_channels: 1 or 3, for 8-bit images when no ``scaling`` is given.
    :param scaling: a :class:`rasters.Scaling` (its sar_channels wins).
    :param seed: non-negative seed of the data order and augmentations.
    :param start_batch: global batch number to start from; a run resumed at k
        sees what an uninterrupted run sees after k batches.
    :param num_workers: loader processes; None for min(4, CPUs), 0 to load in-process.
    :param rank: this process's rank; None to ask torch.distributed (else 0).
    :param world_size: number of ranks; None to ask torch.distributed (else 1).
    :param pairs: the pairs of the two folders, when already found.
    :return: an iterator of (batch, {}) with batch a float32 tensor
        (batch_size, sar_channels + 3, image_size, image_size), SAR channels first.
    :raises DataError: the folders cannot be paired or hold too few pairs.
    """
    pairs = pairs if pairs is not None else find_pairs(data_dir_sar, data_dir_opt)
    distributed = th.distributed.is_available() and th.distributed.is_initialized()
    if rank is None:
        rank = th.distributed.get_rank() if distributed else 0
    if world_size is None:
        world_size = th.distributed.get_world_size() if distributed else 1
    if len(pairs) < batch_size * world_size:
        raise DataError(
            f"{data_dir_sar} has {len(pairs)} pairs, fewer than one global batch of "
            f"{batch_size} x {world_size} ranks; lower --batch_size"
        )
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    sampler = GlobalBatchSampler(
        len(pairs),
        batch_size,
        rank=rank,
        world_size=world_size,
        deterministic=deterministic,
        seed=seed,
        start_batch=start_batch,
    )
    dataset = PairedDataset(
        pairs,
        image_size,
        sar_channels=sar_channels,
        random_crop=random_crop,
        random_flip=random_flip,
        scaling=scaling,
    )
    loader = th.utils.data.DataLoader(
        _Samples(dataset),
        batch_sampler=sampler,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=th.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    return _batches(loader)


def _batches(loader):
    report = _DataReport()
    for batch in loader:
        if isinstance(batch, DataError):
            raise DataError(str(batch)) from None
        images, stats, skipped = batch
        report.add(stats, skipped)
        yield images, {}
