"""Model files shipped with the core detectors (see each folder's SOURCE.md)."""
