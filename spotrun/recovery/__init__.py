"""Recovery: where a restore finds the bytes of a committed checkpoint nearest to it."""
