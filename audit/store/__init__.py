"""Storage: `files` (sha256, atomic writes), `rundir` (THE run-directory format: writer and
reader), `registry` (the database of finished runs)."""
