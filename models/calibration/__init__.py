"""Decision thresholds shipped with the package, measured on named protocols."""
