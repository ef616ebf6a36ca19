"""The site data store: identity-labelled photos, cached face chips, erasure list.

A site folder holds ``<site_dir>/<identity>/<photo>.jpg``. Folders whose name
starts with ``_`` or ``.`` are not training identities: ``_heldout/`` holds the
site's held-out evaluation photos (``_heldout/<identity>/<photo>.jpg`` and
``_heldout/pairs.csv`` with ``path1,path2,same`` relative to ``_heldout/``),
and ``.facefed/`` holds the store's state (cached chips, the erasure list, the
local margin head, the privacy ledger).

Faces are detected and aligned once per photo and the 150x150 chips cached in
``.facefed/chips.npz``; only chips ever reach the training code, and nothing
in this module leaves the site.
"""

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefed.core.errors import ConfigurationError, FacefedError

logger = logging.getLogger(__name__)

CHIP_SIZE = 150
STATE_DIR = ".facefed"
HELDOUT_DIR = "_heldout"
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
PAIRS_FILE = "pairs.csv"
# A margin head separates classes: with one identity its loss is constant
# and a round would only add DP noise to the shared layers.
MIN_TRAINING_IDENTITIES = 2
# Held-out accuracy is judged by folds that each need both kinds of pair.
MIN_PAIRS_OF_EACH_KIND = 2

ChipFn = Callable[[Path], np.ndarray | None]


@dataclass(frozen=True)
class SiteSamples:
    """The training samples of one site.

    Attributes:
        chips: Aligned face chips, uint8 (N, 150, 150, 3) RGB.
        labels: Class index of each chip, int64 (N,).
        identities: Identity name of each class index.
    """

    chips: np.ndarray
    labels: np.ndarray
    identities: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class HeldOutPairs:
    """Verification pairs of identities the site never trains on.

    Attributes:
        first: Chips of the first photo of each pair, uint8 (P, 150, 150, 3).
        second: Chips of the second photo, same shape.
        same: 1 for a genuine pair, 0 for an impostor pair, int64 (P,).
    """

    first: np.ndarray
    second: np.ndarray
    same: np.ndarray

    def __len__(self) -> int:
        return int(self.same.shape[0])


@dataclass(frozen=True)
class PrepareReport:
    """What `SiteDataStore.prepare` did.

    Attributes:
        photos: Photos found (training and held-out).
        computed: Chips computed in this call.
        cached: Chips already in the cache.
        failed: Photos where no usable face was found.
    """

    photos: int
    computed: int
    cached: int
    failed: int


class SiteDataStore:
    """Identity-labelled face photos of one site, with chip cache and erasures.

    Args:
        root: The site folder.
        min_photos_per_identity: Identities with fewer usable chips are not
            trained on (a margin head needs at least two views of a class).
    """

    def __init__(self, root: Path | str, *, min_photos_per_identity: int = 2) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigurationError(f"The site folder {self.root} does not exist.")
        if min_photos_per_identity < 1:
            raise ConfigurationError(
                "min_photos_per_identity must be at least 1, got "
                f"{min_photos_per_identity}."
            )
        self.min_photos_per_identity = min_photos_per_identity
        self.state_dir = self.root / STATE_DIR
        self.state_dir.mkdir(exist_ok=True)

    # -- erasure ---------------------------------------------------------------

    @property
    def _erased_path(self) -> Path:
        return self.state_dir / "erased.json"

    def erased(self) -> frozenset[str]:
        """Subject refs erased at this site; their samples are never trained on."""
        return _erased_of(self.root)

    def forget(self, subject_ref: str) -> int:
        """Drop an erased subject's samples from every later training round.

        The subject ref is the identity folder name, or a ref mapped to one in
        ``subject_refs.csv`` (``identity,subject_ref``). The ref is recorded
        in the erasure list before the cached chips are purged, so a crash in
        between still keeps the subject out of training.

        Args:
            subject_ref: The erased subject's reference.

        Returns:
            The number of cached chips removed.

        Raises:
            ConfigurationError: The subject ref is empty or has a path separator.
        """
        if not subject_ref or "/" in subject_ref or "\\" in subject_ref:
            raise ConfigurationError(
                f"A subject ref must be a non-empty name, got {subject_ref!r}."
            )
        erased = set(self.erased()) | {subject_ref}
        _atomic_write(
            self._erased_path, json.dumps({"erased": sorted(erased)}).encode()
        )
        identities = {subject_ref} | {
            identity
            for identity, ref in self._subject_refs().items()
            if ref == subject_ref
        }
        removed = self._purge_cache(identities)
        logger.info(
            "Site %s forgot a subject: %d cached chips removed", self.root.name, removed
        )
        return removed

    def _subject_refs(self) -> dict[str, str]:
        return _subject_refs_of(self.root)

    def _is_erased(
        self, identity: str, erased: frozenset[str], refs: dict[str, str]
    ) -> bool:
        return identity in erased or refs.get(identity) in erased

    # -- photos and chips ------------------------------------------------------

    def training_photos(self) -> dict[str, list[Path]]:
        """Photos of every training identity not erased, by identity name."""
        erased, refs = self.erased(), self._subject_refs()
        photos: dict[str, list[Path]] = {}
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name.startswith(("_", ".")):
                continue
            if self._is_erased(folder.name, erased, refs):
                continue
            found = _photos_in(folder)
            if found:
                photos[folder.name] = found
        return photos

    def heldout_photos(self) -> list[Path]:
        """Photos of the held-out identities (never trained on)."""
        folder = self.root / HELDOUT_DIR
        if not folder.is_dir():
            return []
        return [
            photo
            for sub in sorted(p for p in folder.iterdir() if p.is_dir())
            for photo in _photos_in(sub)
        ]

    def prepare(
        self,
        chip_fn: ChipFn,
        *,
        on_photo: Callable[[], None] | None = None,
    ) -> PrepareReport:
        """Detect and align every photo once, caching its chip.

        Args:
            chip_fn: Returns the 150x150 RGB uint8 chip of a photo's main face,
                or None when the photo has no usable face.
            on_photo: Called after each photo (progress bars).

        Returns:
            Counts of what was done.
        """
        cache = self._load_cache()
        photos = [p for ps in self.training_photos().values() for p in ps]
        photos += self.heldout_photos()
        computed = cached = failed = 0
        for photo in photos:
            key = self._key(photo)
            if key in cache:
                cached += 1
            else:
                chip = chip_fn(photo)
                cache[key] = None if chip is None else _check_chip(chip, photo)
                computed += 1
            if cache[key] is None:
                failed += 1
            if on_photo is not None:
                on_photo()
        if computed:
            self._save_cache(cache)
        report = PrepareReport(len(photos), computed, cached, failed)
        logger.info(
            "Site %s: %d photos, %d chips computed, %d cached, %d without a face",
            self.root.name,
            report.photos,
            computed,
            cached,
            failed,
        )
        return report

    def training_samples(self) -> SiteSamples:
        """The cached chips of the training identities, labelled.

        Raises:
            FacefedError: No identity has enough usable chips.
        """
        cache = self._load_cache()
        chips: list[np.ndarray] = []
        labels: list[int] = []
        identities: list[str] = []
        for identity, photos in self.training_photos().items():
            found = [cache.get(self._key(p)) for p in photos]
            usable = [c for c in found if c is not None]
            if len(usable) < self.min_photos_per_identity:
                continue
            chips.extend(usable)
            labels.extend([len(identities)] * len(usable))
            identities.append(identity)
        if len(identities) < MIN_TRAINING_IDENTITIES:
            raise FacefedError(
                f"Site {self.root} has {len(identities)} training identities with at "
                f"least {self.min_photos_per_identity} usable face chips, "
                f"{MIN_TRAINING_IDENTITIES} are needed. Chips are computed "
                "automatically when a round starts, and a photo where no face is "
                "found does not count: add photos with a clear, frontal face."
            )
        return SiteSamples(
            np.stack(chips), np.asarray(labels, np.int64), tuple(identities)
        )

    def heldout_pairs(self) -> HeldOutPairs:
        """The held-out verification pairs whose two chips are both usable.

        Raises:
            FacefedError: The site has no held-out pairs.
        """
        pairs_file = self.root / HELDOUT_DIR / PAIRS_FILE
        if not pairs_file.exists():
            raise FacefedError(f"Site {self.root} has no {HELDOUT_DIR}/{PAIRS_FILE}.")
        cache = self._load_cache()
        first, second, same = [], [], []
        with open(pairs_file, newline="") as handle:
            for row in csv.DictReader(handle):
                a = cache.get(self._key(self.root / HELDOUT_DIR / row["path1"]))
                b = cache.get(self._key(self.root / HELDOUT_DIR / row["path2"]))
                if a is None or b is None:
                    continue
                first.append(a)
                second.append(b)
                same.append(int(row["same"]))
        if not same:
            raise FacefedError(f"Site {self.root} has no usable held-out pair.")
        return HeldOutPairs(
            np.stack(first), np.stack(second), np.asarray(same, np.int64)
        )

    # -- cache -----------------------------------------------------------------

    @property
    def _cache_path(self) -> Path:
        return self.state_dir / "chips.npz"

    def _key(self, photo: Path) -> str:
        return photo.relative_to(self.root).as_posix()

    def _load_cache(self) -> dict[str, np.ndarray | None]:
        if not self._cache_path.exists():
            return {}
        with np.load(self._cache_path, allow_pickle=False) as data:
            keys = [str(k) for k in data["keys"]]
            ok = data["ok"]
            chips = data["chips"]
        cache: dict[str, np.ndarray | None] = {}
        index = 0
        for key, good in zip(keys, ok, strict=True):
            if good:
                cache[key] = chips[index]
                index += 1
            else:
                cache[key] = None
        return cache

    def _save_cache(self, cache: dict[str, np.ndarray | None]) -> None:
        keys = sorted(cache)
        good = [cache[k] for k in keys if cache[k] is not None]
        chips = (
            np.stack([c for c in good if c is not None])
            if good
            else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        )
        tmp = self._cache_path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            keys=np.asarray(keys, dtype=str),
            ok=np.asarray([cache[k] is not None for k in keys], bool),
            chips=chips,
        )
        os.replace(tmp, self._cache_path)

    def _purge_cache(self, identities: Iterable[str]) -> int:
        cache = self._load_cache()
        names = set(identities)
        doomed = [k for k in cache if k.split("/", 1)[0] in names]
        removed = sum(1 for k in doomed if cache[k] is not None)
        for key in doomed:
            del cache[key]
        if doomed:
            self._save_cache(cache)
        return removed

    def fingerprint(self) -> str:
        """A short hash of the training chips' keys (feature caches key on it)."""
        keys = sorted(
            self._key(p) for ps in self.training_photos().values() for p in ps
        )
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def site_folder_problems(
    root: Path | str, *, min_photos_per_identity: int = 2
) -> list[str]:
    """What keeps a site folder from taking part in a run, checked on disk alone.

    The check reads the folder as `SiteDataStore` and the site runtime will
    (training identities, the erasure list, ``_heldout/pairs.csv``) but
    writes nothing and detects no face, so it runs before a run starts.
    A photo where no face is found can still make a site fail its first
    round.

    Args:
        root: The site folder.
        min_photos_per_identity: Photos an identity needs to be trained on.

    Returns:
        One sentence per problem; empty when the folder looks usable.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"The site folder {root} does not exist."]
    problems = []
    identities = _trainable_identities(root, min_photos_per_identity)
    if identities < MIN_TRAINING_IDENTITIES:
        problems.append(
            f"Site {root} has {identities} training identities with at least "
            f"{min_photos_per_identity} photos, {MIN_TRAINING_IDENTITIES} are "
            "needed (<site>/<identity>/<photo>.jpg)."
        )
    pairs_problem = _heldout_pairs_problem(root)
    if pairs_problem:
        problems.append(pairs_problem)
    return problems


def _trainable_identities(root: Path, min_photos: int) -> int:
    erased, refs = _erased_of(root), _subject_refs_of(root)
    return sum(
        1
        for folder in root.iterdir()
        if folder.is_dir()
        and not folder.name.startswith(("_", "."))
        and folder.name not in erased
        and refs.get(folder.name) not in erased
        and len(_photos_in(folder)) >= min_photos
    )


def _erased_of(root: Path) -> frozenset[str]:
    path = root / STATE_DIR / "erased.json"
    if not path.exists():
        return frozenset()
    return frozenset(json.loads(path.read_text())["erased"])


def _subject_refs_of(root: Path) -> dict[str, str]:
    path = root / "subject_refs.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        return {row["identity"]: row["subject_ref"] for row in csv.DictReader(handle)}


def _heldout_pairs_problem(root: Path) -> str | None:
    heldout = root / HELDOUT_DIR
    pairs_file = heldout / PAIRS_FILE
    if not pairs_file.is_file():
        return (
            f"Site {root} has no {HELDOUT_DIR}/{PAIRS_FILE} (held-out pairs: "
            f"columns path1,path2,same, paths relative to {HELDOUT_DIR}/)."
        )
    counts = {0: 0, 1: 0}
    try:
        with open(pairs_file, newline="") as handle:
            for row in csv.DictReader(handle):
                first, second = heldout / row["path1"], heldout / row["path2"]
                if first.is_file() and second.is_file():
                    counts[int(row["same"]) != 0] += 1
    except (KeyError, TypeError, ValueError, csv.Error, UnicodeDecodeError):
        return (
            f"Site {root}: {HELDOUT_DIR}/{PAIRS_FILE} cannot be read; it needs the "
            "columns path1,path2,same (same: 1 or 0)."
        )
    if min(counts.values()) < MIN_PAIRS_OF_EACH_KIND:
        return (
            f"Site {root} has {counts[1]} genuine and {counts[0]} impostor "
            f"held-out pairs whose photos exist under {HELDOUT_DIR}/, at least "
            f"{MIN_PAIRS_OF_EACH_KIND} of each are needed."
        )
    return None


def _photos_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
    )


def _check_chip(chip: np.ndarray, photo: Path) -> np.ndarray:
    if chip.shape != (CHIP_SIZE, CHIP_SIZE, 3) or chip.dtype != np.uint8:
        raise ConfigurationError(
            f"The chip function returned {chip.dtype} {chip.shape} for {photo.name}; "
            f"expected uint8 ({CHIP_SIZE}, {CHIP_SIZE}, 3)."
        )
    return chip


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
