"""Index advice from the query shapes the digest collects (see docs/advice.md)."""
