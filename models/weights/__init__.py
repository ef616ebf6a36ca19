"""Model weights shipped with facefed; each folder's SOURCE.md gives origin, licence."""
