"""Studies as stored: the attributes hpsearch keeps on a study, and opening one by name.

The validated spec is stored on the study (user attr, versioned JSON), so a worker on another
machine needs only the study name and the storage URL. Reading that spec back, with the sampler
and pruner it names, is `search.run.load`'s: storage and spec stand side by side.
"""

from __future__ import annotations

import warnings

import optuna

from search._errors import SpecError, StudyNotFoundError
from search.storage._reader import reading

SPEC_ATTR = "hpsearch_spec"  # the versioned spec JSON
SPEC_SIGNATURE_ATTR = "hpsearch_spec_hmac"  # its HMAC with the token (search._auth), if one
LR_FIND_ATTR = "hpsearch_lr_find"  # the LR range test that chose the stored lr range
WARM_START_ATTR = "hpsearch_warm_start"  # source trials enqueued by `run --warm-start`
RETRAIN_ATTR = "hpsearch_retrain"  # the final test of `hpsearch retrain`
TRACKING_ATTR = "hpsearch_tracking"  # the study's run in a tracker (its MLflow parent run)


def open_study(name: str, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, str]:
    """An existing hpsearch study and its stored spec (JSON); unknown names list the studies
    there, a study hpsearch did not create is refused."""
    names = optuna.get_all_study_names(storage)
    if name not in names:
        listing = ", ".join(names) if names else "none"
        raise StudyNotFoundError(f"no study named {name!r} in this storage (studies: {listing})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Read through the two-query reader: a view reads the whole study once.
        study = optuna.load_study(study_name=name, storage=reading(storage))
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise SpecError(f"study {name!r} was not created by hpsearch (no stored spec)")
    return study, stored
