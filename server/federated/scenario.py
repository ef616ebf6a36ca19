"""The measured scenario: LFW split across three sites with different cameras.

Layout written by `build_scenario` (all photos are copies; nothing is
downloaded):

- ``site-<k>/<identity>/<photo>.jpg``: training identities of site k, taken
  from LFW people sets (= View-2 folds) 4-7, identities with at least two
  photos, dealt round robin across the sites, at most `photos_per_identity`
  photos each and `photos_per_site` in all (0: no limit, the default), every
  photo degraded by the site's camera profile;
- ``site-<k>/_heldout/``: official View-2 pairs of fold k+1 (folds 1-3;
  `pairs_per_site` of them, half genuine), degraded the same way; LFW
  folds are identity-disjoint, so no held-out person is ever trained on;
- ``clean/_heldout/``: the clean photos of the same held-out pairs, to check
  that fine-tuning does not hurt the general case.
"""

import csv
import logging
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facefed.client.federated.profiles import degrade
from facefed.client.federated.store import HELDOUT_DIR
from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

SITE_PROFILES = ("low_light", "motion_blur_jpeg", "lowres_gray")


@dataclass(frozen=True)
class Scenario:
    """Where `build_scenario` put things.

    Attributes:
        sites: The site folders, one per camera profile.
        clean: The folder of the clean held-out pairs.
    """

    sites: tuple[Path, ...]
    clean: Path


def build_scenario(
    shared_data: Path,
    out: Path,
    *,
    photos_per_site: int = 0,
    photos_per_identity: int = 20,
    pairs_per_site: int = 600,
    rng: np.random.Generator,
) -> Scenario:
    """Write the three degraded sites and the clean held-out set.

    Args:
        shared_data: The shared data folder (``identity/``, ``labels/``,
            ``protocols/``).
        out: Destination folder (replaced).
        photos_per_site: Training photos per site at most; 0 takes every
            photo of the site's identities (the measured scenario: the
            lower sampling rate of a large site is what lets DP-SGD reach
            epsilon 8 with little noise, Abadi et al. 2016).
        photos_per_identity: Training photos per identity at most.
        pairs_per_site: Held-out pairs per site: the first half genuine and
            the first half impostor pairs of the site's fold (600 = all).
        rng: Source of the degradations and the identity shuffle.

    Raises:
        ConfigurationError: The shared data is not there, or a count is out
            of range.
    """
    if photos_per_site < 0 or photos_per_identity < 2 or pairs_per_site < 2:
        raise ConfigurationError(
            "photos_per_site must be >= 0, photos_per_identity >= 2 and "
            f"pairs_per_site >= 2; got {photos_per_site}, {photos_per_identity}, "
            f"{pairs_per_site}."
        )
    labels = shared_data / "labels" / "identity_labels.csv"
    pairs_csv = shared_data / "protocols" / "lfw_pairs_folds01-07.csv"
    if not labels.exists() or not pairs_csv.exists():
        raise ConfigurationError(f"{shared_data} has no LFW labels or pairs.")
    shutil.rmtree(out, ignore_errors=True)

    by_identity = _training_photos(labels)
    identities = sorted(by_identity)
    rng.shuffle(identities)
    with open(pairs_csv, newline="") as handle:
        pairs = list(csv.DictReader(handle))

    sites = []
    used_pairs: list[dict[str, str]] = []
    for index, profile in enumerate(SITE_PROFILES):
        site = out / f"site-{index + 1}-{profile}"
        mine = identities[index :: len(SITE_PROFILES)]
        _write_training(
            site,
            mine,
            by_identity,
            shared_data,
            profile,
            rng,
            photos_per_site=photos_per_site,
            photos_per_identity=photos_per_identity,
        )
        fold_pairs = _subset(
            [p for p in pairs if int(p["fold"]) == index + 1], pairs_per_site
        )
        used_pairs.extend(fold_pairs)
        _write_heldout(site / HELDOUT_DIR, fold_pairs, shared_data, profile, rng)
        sites.append(site)
        logger.info("Scenario site %s written (%s)", site.name, profile)
    clean = out / "clean"
    _write_heldout(clean / HELDOUT_DIR, used_pairs, shared_data, "clean", rng)
    return Scenario(tuple(sites), clean)


def _subset(pairs: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    genuine = [p for p in pairs if p["same"] == "1"][: count // 2]
    impostor = [p for p in pairs if p["same"] == "0"][: count - count // 2]
    return genuine + impostor


def _training_photos(labels: Path) -> dict[str, list[str]]:
    photos: dict[str, list[str]] = defaultdict(list)
    with open(labels, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["source"] != "lfw_deepfunneled":
                continue
            if row["split"] in ("lfw_set04", "lfw_set05", "lfw_set06", "lfw_set07"):
                photos[row["identity"]].append(row["path"])
    return {k: sorted(v) for k, v in photos.items() if len(v) >= 2}


def _write_training(
    site: Path,
    identities: list[str],
    by_identity: dict[str, list[str]],
    shared_data: Path,
    profile: str,
    rng: np.random.Generator,
    *,
    photos_per_site: int,
    photos_per_identity: int,
) -> None:
    written = 0
    for identity in identities:
        chosen = by_identity[identity][:photos_per_identity]
        if photos_per_site and written + len(chosen) > photos_per_site:
            break
        for relative in chosen:
            _copy_degraded(shared_data / relative, site / identity, profile, rng)
        written += len(chosen)


def _write_heldout(
    folder: Path,
    pairs: list[dict[str, str]],
    shared_data: Path,
    profile: str,
    rng: np.random.Generator,
) -> None:
    rows = []
    for pair in pairs:
        names = []
        for key in ("path1", "path2"):
            source = shared_data / pair[key]
            identity = source.parent.name
            target = folder / identity / source.name
            if not target.exists():
                _copy_degraded(source, folder / identity, profile, rng)
            names.append(f"{identity}/{source.name}")
        rows.append([*names, pair["same"]])
    with open(folder / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path1", "path2", "same"])
        writer.writerows(rows)


def _copy_degraded(
    source: Path, folder: Path, profile: str, rng: np.random.Generator
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        raise ConfigurationError(f"Cannot read the photo {source}.")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    degraded = degrade(rgb, profile, rng=rng)
    cv2.imwrite(
        str(folder / source.name),
        cv2.cvtColor(degraded, cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_JPEG_QUALITY, 95],
    )
