"""Privacy attacks on the release ledger (issue 5)."""
