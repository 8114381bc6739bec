"""A stored study loaded whole: the Optuna study with its spec, sampler and pruner.

Storage keeps the spec as JSON (`search.storage.open_study`) and the spec package knows how to
read it and build the sampler and pruner; this is where the two meet. Where this process holds
a token ($HPSEARCH_TOKEN), a stored spec is trusted only with its signature (`verified`): what
a study's spec names (a trainer's command, a function) is what its workers run.
"""

from __future__ import annotations

import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler

from search._auth import TOKEN_ENV, client_token, same_token, spec_signature
from search._errors import SpecError
from search.spec import StudySpec, build_pruner, build_sampler, spec_from_json
from search.storage import (
    SPEC_SIGNATURE_ATTR,
    GroupedPruner,
    open_study,
    with_retry,
    with_trimmed_history,
)


def load(name: str, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, StudySpec]:
    """An existing hpsearch study and its stored spec; unknown names list the studies there."""
    study, stored = open_study(name, storage)
    verified(study, stored)
    spec = spec_from_json(stored)
    study.sampler = study_sampler(spec)
    study.pruner = study_pruner(spec)
    return study, spec


def study_sampler(spec: StudySpec, *, salt: int = 0) -> BaseSampler:
    """The study's sampler (`build_sampler`, `salt` shifting its seed); TPE past a thousand
    finished trials sees a trimmed history (`search.storage.with_trimmed_history`)."""
    return with_trimmed_history(build_sampler(spec, salt=salt))


def study_pruner(spec: StudySpec) -> BasePruner:
    """The study's pruner (`build_pruner`), judging within `pruner.within`'s groups if set."""
    pruner = build_pruner(spec)
    if not spec.pruner.within:
        return pruner
    return GroupedPruner(pruner, [spec.space[key].optuna_name(key) for key in spec.pruner.within])


def sign(study: optuna.Study, stored: str) -> None:
    """Store the signature of `stored` (the study's spec JSON) made with this process's token;
    nothing without one."""
    token = client_token()
    if token is None:
        return
    signature = spec_signature(token, study.study_name, stored)
    if study.user_attrs.get(SPEC_SIGNATURE_ATTR) != signature:
        with_retry(lambda: study.set_user_attr(SPEC_SIGNATURE_ATTR, signature),
                   what="signing the study's spec")


def verified(study: optuna.Study, stored: str) -> None:
    """SpecError unless the stored spec carries the signature this process's token makes (no
    check without a token): one who could write the storage but holds no token cannot choose
    what the study's workers run."""
    token = client_token()
    if token is None:
        return
    signature = study.user_attrs.get(SPEC_SIGNATURE_ATTR)
    fix = (f"if the study file is yours, `hpsearch run STUDY.yaml --create-only` with the token "
           f"in ${TOKEN_ENV} signs it again")
    if not isinstance(signature, str):
        raise SpecError(f"study {study.study_name!r}: its stored spec is not signed, and this "
                        f"process holds a token (${TOKEN_ENV}): refusing to run what it names; "
                        f"{fix}")
    if not same_token(signature, spec_signature(token, study.study_name, stored)):
        raise SpecError(f"study {study.study_name!r}: its stored spec does not match its "
                        "signature (changed without the token, or signed with another "
                        f"token): refusing to run what it names; {fix}")
