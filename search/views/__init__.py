"""What people see of a study: `run`'s progress, `status` and `best`, the HTML report and its
figures, and optuna-dashboard on the storage. Views read the storage; they never change a trial.
"""

from __future__ import annotations

from search.views._choices import choices_text, kinds
from search.views._dashboard import serve as serve_dashboard
from search.views._progress import RunDisplay, flat_params, make_console, outcome_from_frozen
from search.views._report import NothingToReport, build_report, write_report
from search.views._status import (
    best_record,
    render_status,
    show_best,
    show_status,
    status_data,
    studies_overview,
)

__all__ = [
    "NothingToReport",
    "RunDisplay",
    "best_record",
    "build_report",
    "choices_text",
    "flat_params",
    "kinds",
    "make_console",
    "outcome_from_frozen",
    "render_status",
    "serve_dashboard",
    "show_best",
    "show_status",
    "status_data",
    "studies_overview",
    "write_report",
]
