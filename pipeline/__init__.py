"""anole's pure library: data, tasks, models, learners, checkpoints and evaluation.

Nothing in this package imports Ray or Prefect; `workers/` and `flows/` build on it.
"""

__version__ = "0.1.0"
