"""The gap study's report: ``OUT/report.md`` with PNG figures in ``OUT/figures``.

Everything is computed from the stages' saved outputs (offline JSON, open-loop replays,
closed-loop results and trajectories); the only simulator run is the side-by-side video
of a failing and a succeeding policy. The findings section is generated from the
numbers, and says plainly when a published finding does not reproduce.

- :mod:`.rows`: one :class:`PolicyRow` per policy, collected from the stages' outputs.
- :mod:`.tables`: the markdown tables and the correlation table.
- :mod:`.figures`: the figures and the side-by-side video.
- :mod:`.findings`: findings written from the numbers.
- :mod:`.history`: the "History and copycat" section.
- :mod:`.write`: :func:`write_report`.
"""

from steerloop.evaluation.report.findings import dagger_comparisons, dagger_table, findings
from steerloop.evaluation.report.history import (history_baselines, history_findings, history_table, sweep_groups,
                                                 sweep_table)
from steerloop.evaluation.report.rows import PolicyRow, collect
from steerloop.evaluation.report.tables import correlation_table, correlations, offline_table, policy_table
from steerloop.evaluation.report.write import write_report

__all__ = ["PolicyRow", "collect", "correlation_table", "correlations", "dagger_comparisons", "dagger_table", "findings",
           "history_baselines", "history_findings", "history_table", "offline_table", "policy_table", "sweep_groups",
           "sweep_table", "write_report"]
