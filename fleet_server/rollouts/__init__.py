"""Staged rollouts: plan (who is in which stage), params (what a rollout is started with, checked once for the CLI
and the API), gates (may a stage advance?), engine (decide), service (act)."""
