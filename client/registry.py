"""The site's own list of whom it enrolled: server subject id to site reference.

The server knows a subject by a random id; the site knows the person by its
own reference (the same one its training data uses). The site keeps this map
so that erasing a subject by id also drops that person's local training
samples. It holds no biometric data and no subject tokens.
"""

import json
import os
import tempfile
from pathlib import Path

from facefed.core.errors import ConfigurationError

FILE_NAME = "enrolled.json"


class SiteRegistry:
    """A JSON file in the site folder mapping subject ids to subject refs.

    Args:
        site_dir: The site folder (created when missing).
    """

    def __init__(self, site_dir: Path) -> None:
        site_dir.mkdir(parents=True, exist_ok=True)
        self.path = site_dir / FILE_NAME

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigurationError(
                f"The site registry {self.path} is unreadable: {error}."
            ) from error
        return {str(key): str(value) for key, value in data.items()}

    def _save(self, entries: dict[str, str]) -> None:
        handle, name = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(entries, out, indent=1, sort_keys=True)
        os.replace(name, self.path)

    def record(self, subject_id: str, subject_ref: str) -> None:
        """Remember that `subject_id` is the site's `subject_ref`."""
        entries = self._load()
        entries[subject_id] = subject_ref
        self._save(entries)

    def ref_of(self, subject_id: str) -> str | None:
        """The site reference of a subject id, or None when unknown."""
        return self._load().get(subject_id)

    def subject_of(self, subject_ref: str) -> str | None:
        """The subject id the site enrolled under `subject_ref`, or None."""
        for subject_id, ref in self._load().items():
            if ref == subject_ref:
                return subject_id
        return None

    def remove(self, subject_id: str) -> None:
        """Forget a subject id (after its erasure)."""
        entries = self._load()
        if entries.pop(subject_id, None) is not None:
            self._save(entries)

    def __len__(self) -> int:
        return len(self._load())
