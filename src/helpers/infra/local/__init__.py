"""The local backend: a directory tree, SQLite, subprocess training jobs, Triton and its
router, all on this machine."""
