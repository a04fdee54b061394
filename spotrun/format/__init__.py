"""The checkpoint format: what a checkpoint holds (snapshot, state, sharded DCP files), how its
bytes are checked (checksum, manifest) and how it is committed (commit: manifest last)."""
