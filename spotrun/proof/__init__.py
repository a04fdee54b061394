"""Proof that a run resumes exactly: comparing checkpoints and diagnosing divergence."""
