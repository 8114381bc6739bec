"""Launching a study: creating or joining it (with its stored spec, sampler and pruner), the
LR range test, warm starts, local workers until the budget is met, retrain, stop and delete.

Names load on first use (`search._lazy`): `hpsearch status` and friends load no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from search._lazy import lazy_face

__all__, __getattr__, __dir__ = lazy_face(__name__, {
    "Launch": "_launch",
    "WarmStart": "_warm_start",
    "create_or_load": "_study",
    "delete_study_files": "_manage",
    "final_test": "_retrain",
    "for_new_study": "_lr_find",
    "load": "_studies",
    "load_source": "_warm_start",
    "lr_find": "_lr_find",
    "needs_test": "_lr_find",
    "parse_source": "_warm_start",
    "reseed": "_study",
    "retrain": "_retrain",
    "retrain_and_report": "_retrain",
    "run_study": "_launch",
    "stop_study": "_manage",
    "study_pruner": "_studies",
    "study_sampler": "_studies",
    "warm_start": "_warm_start",
})

if TYPE_CHECKING:  # the names above, for type checkers and readers
    from search.run._launch import Launch, run_study  # noqa: F401
    from search.run._lr_find import for_new_study, lr_find, needs_test  # noqa: F401
    from search.run._manage import delete_study_files, stop_study  # noqa: F401
    from search.run._retrain import final_test, retrain, retrain_and_report  # noqa: F401
    from search.run._studies import load, study_pruner, study_sampler  # noqa: F401
    from search.run._study import create_or_load, reseed  # noqa: F401
    from search.run._warm_start import WarmStart, load_source, parse_source, warm_start  # noqa: F401
