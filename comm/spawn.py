"""Moved: the local launcher serves plain functions too (``tokenloom.launch.local.spawn_ranks``).

This name stays only until every caller imports the launcher's (issue 17: one local launcher).
"""

from tokenloom.launch.local import RankError, spawn_ranks  # noqa: F401
