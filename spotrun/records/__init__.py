"""The run's records under its URL: the layout of the run folder, the ledger and its typed
events, the one-writer lease, the instance a segment ran on, and the launcher's state."""
