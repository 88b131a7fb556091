"""Staged rollouts: plan (who is in which stage), gates (may a stage advance?), engine (decide), service (act)."""
