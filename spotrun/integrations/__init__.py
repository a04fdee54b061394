"""Trainer integrations (optional extras): Hugging Face ``Trainer`` (:mod:`.hf`,
``pip install spotrun[hf]``), Lightning (:mod:`.lightning`, ``spotrun[lightning]``) and
Accelerate (:mod:`.accelerate`, ``spotrun[accelerate]``).

Each gives a trainer spotrun's guarantees without leaving it: notices and signals with the
all-rank agreement, the commit protocol (manifest last, sizes and checksums), the newest
*valid* checkpoint on resume, ledger records and exit code 75. Import the submodule you
need; this package imports none of the trainers. Details: docs/integrations.md.
"""
