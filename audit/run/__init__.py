"""One audit as plain library calls (no Prefect): `plan` (which images, which costly pairs, which
batches and their content keys), `images` (decode, preprocess, thumbnail), `batch` (explain and
score one batch into its result folder), `costly` (repeatability, randomization, fidelity for
sampled pairs), `assemble` (batch folders -> run directory), `provenance` (run.json's model,
dataset and environment sections). `flows/` wraps these into Prefect tasks; a notebook can
call them directly.
"""
