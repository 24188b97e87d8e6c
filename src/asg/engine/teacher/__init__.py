"""The frozen teacher's outputs: live, in memory or from the disk cache (its key, storage modes, files and build)."""
