"""Machinery for tests/test_readme_commands.py: parse README.md's fenced blocks and run their commands."""
