"""Where bytes live: local or gs:// files, checkpoints, their checksums and the run lock."""
