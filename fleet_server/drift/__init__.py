"""Drift statistics on binned counts, looked up by name (see :mod:`fleet_server.drift.registry`)."""

from .registry import (
    CORRECTIONS,
    StatBatch,
    Statistic,
    StatResult,
    UnknownStatisticError,
    bonferroni,
    correct,
    get_statistic,
    holm,
    statistics,
)

__all__ = ["CORRECTIONS", "StatBatch", "StatResult", "Statistic", "UnknownStatisticError", "bonferroni", "correct",
           "get_statistic", "holm", "statistics"]
