"""The operator-facing HTTP endpoint (health now; metrics and digest later)."""
