"""`hpsearch report`: one self-contained HTML file that explains a finished (or running) study.

plotly.js is inlined once in the page, so the file opens offline and can be mailed or archived
as it is. Sections: the study at a glance, optimization history (or the Pareto front), parameter
importances, parallel coordinates, slices, the validation-loss curves of all trials, lr x
batch_size and lr x weight_decay, the best trial's curves and gradient norms, the top trials (with
`constraints:`, the best feasible one and each trial's feasibility), and the retrain result
when there is one.
"""

from __future__ import annotations

import datetime as dt
import html
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search._errors import StorageError
from search._text import fmt
from search.run import load
from search.spec import best_trials, is_feasible, labels, measured
from search.storage import open_storage, redact, resolve_url, shared_study
from search.views import _figures as figs
from search.views._figures import Unavailable
from search.views._progress import flat_params
from search.views._status import constraints_text, no_best_text, retrain_text, status_data

if TYPE_CHECKING:
    import optuna

    from search.spec import StudySpec

TOP_TRIALS = 10
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1180px;padding:0 24px 48px;color:#222}
h1{margin:24px 0 4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555}.note{color:#777;font-style:italic}nav a{margin-right:14px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}code{font-size:12px}
"""

class NothingToReport(Exception):  # noqa: N818 - a state of the study, reported in one line
    """The study has no finished trial, so there is nothing to draw."""

def _esc(value: Any) -> str:
    return html.escape(str(value))

class ReportPage:
    """Collects sections, then renders one HTML document with plotly.js inlined once."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.sections: list[tuple[str, str, str]] = []  # (anchor, heading, html)

    def add(self, heading: str, body: str) -> None:
        anchor = f"s{len(self.sections)}"
        self.sections.append((anchor, heading, body))

    def figure(self, heading: str, make: Callable[[], Any]) -> None:
        """A plotly figure, or the reason it cannot be drawn in its place."""

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's experimental/omitted-trial notes
                fig = make()
        except Unavailable as e:
            self.add(heading, f'<p class="note">Not shown: {_esc(e)}.</p>')
            return
        except Exception as e:  # one broken plot must not cost the whole report
            self.add(heading, f'<p class="note">Not shown: {_esc(type(e).__name__)}: '
                              f'{_esc(e)}</p>')
            return
        fig.update_layout(template="plotly_white", margin={"t": 60})
        body = fig.to_html(full_html=False, include_plotlyjs=False,
                           config={"displaylogo": False, "responsive": True})
        self.add(heading, body)

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        nav = " ".join(f'<a href="#{a}">{_esc(h)}</a>' for a, h, _ in self.sections)
        body = "\n".join(f'<section id="{a}"><h2>{_esc(h)}</h2>\n{b}\n</section>'
                         for a, h, b in self.sections)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{_esc(self.title)}</title><style>{STYLE}</style>"
                f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head>\n"
                f"<body><h1>{_esc(self.title)}</h1>\n<nav>{nav}</nav>\n{body}\n</body></html>\n")

def _summary(data: dict[str, Any], storage: str) -> str:

    c, p = data["counts"], data["pruning"]
    objective = ", ".join(f"{m} ({d})" for m, d in data["objective"].items())
    lines = [
        f"Objective: {_esc(objective)}. Budget: {data['budget']['trials']} trials of "
        f"{data['budget']['epochs']} epochs.",
        f"Trials: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed, "
        f"{c['running']} running, {c['waiting']} waiting.",
    ]
    if p["epochs_full_budget"]:
        lines.append(f"Pruning saved {p['epochs_saved']} of {p['epochs_full_budget']} epochs "
                     f"({p['saved_fraction']:.0%}).")
    if constraints_text(data):
        lines.append(f"{_esc(constraints_text(data)).capitalize()}.")
    for best in data["best"]:
        values = ", ".join(f"{k} {fmt(v)}" for k, v in best["values"].items())
        params = " ".join(f"{k}={fmt(v)}" for k, v in best["params"].items())
        lines.append(f"Best: trial #{best['trial']}: {_esc(values)} &mdash; "
                     f"<code>{_esc(params)}</code>")
    if data.get("constraints") and not data["best"]:
        lines.append(f"Best: {_esc(no_best_text(data))}.")
    if data.get("retrain"):
        lines.append(f"Retrain: {_esc(retrain_text(data['retrain']))}.")
    if data["failures"]:
        reasons = "; ".join(f"#{f['trial']}: {f['reason']}" for f in data["failures"][:5])
        lines.append(f"Failures: {_esc(reasons)}")
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines.append(f'<span class="meta">Storage {_esc(storage)}; generated {stamp}.</span>')
    return "".join(f"<p>{line}</p>" for line in lines)

def _measured(value: float | None) -> str:
    return "missing" if value is None else fmt(value)


def _top_table(study: optuna.Study, spec: StudySpec, top: int) -> str:

    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(spec.objective.metric_names) > 1:
        front = {t.number for t in best_trials(study)}  # feasible, where there are constraints
        trials = [t for t in trials if t.number in front]
    else:
        # The feasible trials first (all are, without constraints), each part by its value.
        sign = 1 if spec.objective.direction_names[0] == "minimize" else -1
        trials = sorted(trials, key=lambda t: (not is_feasible(t), sign * t.values[0]))[:top]
    if not trials:
        return '<p class="note">No completed trial yet.</p>' if not spec.constraints else \
            '<p class="note">No completed trial meets the constraints.</p>'
    metrics = list(spec.objective.metric_names)
    extra = [] if "val_accuracy" in metrics else ["val_accuracy"]
    bounds = labels(spec.constraints)
    head = ["#", "trial", *metrics, *extra, *(["feasible", *bounds] if bounds else []),
            "epochs", "seconds", "params"]
    rows = []
    for rank, t in enumerate(trials, 1):
        history = t.user_attrs.get("history") or []
        last = history[-1] if history else {}
        params = " ".join(f"{k}={fmt(v)}" for k, v in flat_params(spec, t).items())
        shown = measured(spec.constraints, t.user_attrs) if bounds else {}
        cells = [rank, f"#{t.number}", *(fmt(v) for v in t.values),
                 *(fmt(last.get(k)) for k in extra),
                 *((["yes" if is_feasible(t) else "no"] + [_measured(v) for v in shown.values()])
                   if bounds else []),
                 t.user_attrs.get("epochs_run", ""),
                 fmt(t.user_attrs.get("seconds", "")), f"<code>{_esc(params)}</code>"]
        rows.append("<tr>" + "".join(
            f"<td>{c if str(c).startswith('<code>') else _esc(c)}</td>" for c in cells)
            + "</tr>")
    header = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"

def build_report(study: optuna.Study, spec: StudySpec, *, storage: str,
                 top: int = TOP_TRIALS) -> str:
    """The report of one study as an HTML document; NothingToReport without finished trials."""

    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state.name in ("COMPLETE", "PRUNED")]
    if not trials:
        failed = sum(t.state.name == "FAIL" for t in study.get_trials(deepcopy=False))
        why = f" ({failed} failed; see `hpsearch status {spec.name}`)" if failed else ""
        raise NothingToReport(f"study {spec.name!r} has no completed or pruned trial yet"
                              f"{why}: nothing to report")
    data = status_data(study, spec)
    multi = len(spec.objective.metric_names) > 1
    best = data["best"][0]["trial"] if data["best"] else None
    # Optuna's plots copy every trial at each read of `study.trials`: they read a study that
    # hands them the cached trials as they are (they change none).
    study = shared_study(study)
    page = ReportPage(f"hpsearch report: {spec.name}")
    page.add("Summary", _summary(data, storage))
    if multi:
        page.figure("Pareto front", lambda: figs.pareto_front(study, spec))
    page.figure("Optimization history", lambda: figs.optimization_history(study, spec))
    page.figure("Parameter importances", lambda: figs.importances(study, spec))
    page.figure("Parallel coordinates", lambda: figs.parallel_coordinates(study, spec))
    curve = "Validation loss" if spec.trainer is None else spec.objective.metric_names[0]
    page.figure(f"{curve} of every trial", lambda: figs.objective_curves(trials, spec, best))
    for x, y in (("lr", "batch_size"), ("lr", "weight_decay")):
        page.figure(f"{x} x {y}", lambda x=x, y=y: figs.pair(trials, spec, x, y))
    page.figure("Slices", lambda: figs.slices(study, spec))
    if best is not None:
        page.figure(f"Best trial #{best}: curves and gradient norms",
                    lambda: figs.trial_curves(next(t for t in trials if t.number == best),
                                              spec))
    page.add("Top trials" if not multi else "Pareto-optimal trials", _top_table(study, spec, top))
    return page.render()

def write_report(name: str, storage: str | None, *, out: Path, top: int = TOP_TRIALS) -> int:
    """`hpsearch report`: the study's HTML report written to `out`; the exit code."""
    url = resolve_url(storage)
    study, spec = load(name, open_storage(url, must_exist=True))
    try:
        text = build_report(study, spec, storage=redact(url), top=top)
    except NothingToReport as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise StorageError(f"--out: cannot write {out}: {e.strerror or e}") from e
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({len(study.trials)} trials, {size:.1f} MB; opens offline in any "
          "browser)")
    return 0
