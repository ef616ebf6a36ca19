"""The site data store: chips from the real pipeline, held-out pairs, erasure."""

import json

import numpy as np
import pytest

from facefed.client.federated.store import SiteDataStore
from facefed.core.errors import ConfigurationError, FacefedError


def test_training_samples_are_labelled_chips_of_training_identities(sites):
    store = SiteDataStore(sites[0])
    samples = store.training_samples()
    assert samples.chips.shape[1:] == (150, 150, 3)
    assert samples.chips.dtype == np.uint8
    assert len(samples.identities) == 8
    assert not any(name.startswith("_") for name in samples.identities)
    # Every identity has 3 photos on disk; the detector must find most faces.
    counts = np.bincount(samples.labels)
    assert counts.min() >= 2 and counts.max() <= 3
    assert len(samples) >= 20


def test_heldout_pairs_come_only_from_heldout_identities(sites):
    store = SiteDataStore(sites[0])
    pairs = store.heldout_pairs()
    assert len(pairs) >= 10
    assert set(np.unique(pairs.same)) == {0, 1}
    held = {p.parent.name for p in store.heldout_photos()}
    assert held.isdisjoint(store.training_samples().identities)


def test_forget_drops_subject_before_next_round_and_persists(sites):
    store = SiteDataStore(sites[0])
    before = store.training_samples()
    victim = before.identities[0]
    removed = store.forget(victim)
    assert removed == int(np.sum(before.labels == 0))

    reopened = SiteDataStore(sites[0])
    after = reopened.training_samples()
    assert victim not in after.identities
    assert len(after) == len(before) - removed
    assert (
        victim
        in json.loads((sites[0] / ".facefed" / "erased.json").read_text())["erased"]
    )
    # Cached chips of the subject are gone from disk, not only hidden.
    with np.load(sites[0] / ".facefed" / "chips.npz") as data:
        assert not any(str(k).startswith(victim + "/") for k in data["keys"])


def test_forget_through_mapped_subject_ref(sites):
    store = SiteDataStore(sites[0])
    identity = store.training_samples().identities[1]
    (sites[0] / "subject_refs.csv").write_text(
        f"identity,subject_ref\n{identity},subj-42\n"
    )
    store.forget("subj-42")
    assert identity not in store.training_samples().identities


@pytest.mark.parametrize("ref", ["", "../x", "a/b"])
def test_forget_rejects_bad_refs_and_changes_nothing(sites, ref):
    store = SiteDataStore(sites[0])
    with pytest.raises(ConfigurationError, match="subject ref"):
        store.forget(ref)
    assert store.erased() == frozenset()


def test_missing_site_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        SiteDataStore(tmp_path / "nope")


def test_training_without_usable_chips_says_what_to_do(tmp_path, test_data):
    import shutil

    shutil.copytree(test_data / "lfw" / "Ann_Veneman", tmp_path / "Ann_Veneman")
    with pytest.raises(FacefedError) as refused:
        SiteDataStore(tmp_path).training_samples()
    message = str(refused.value)
    assert "0 training identities with at least 2 usable face chips" in message
    assert "computed automatically when a round starts" in message
    assert "prepare" not in message
