"""Storage: `files` (sha256, atomic writes), `rundir` (THE run-directory format: writer and
reader), `registry` (the database of finished runs), `compare` (the regression check between
two runs), `verify` (does a finished run still hold what it recorded)."""
