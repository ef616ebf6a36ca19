"""Face detectors behind one interface, and non-maximum suppression."""
