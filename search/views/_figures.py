"""The report's figures: Optuna's own plots plus what it lacks (curves from `history`).

Every function returns a plotly Figure or raises `Unavailable` with a reason the report shows
in the figure's place: one section that cannot be drawn (too few trials, a missing parameter)
never costs the rest of the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

from search._text import finite
from search.views._progress import flat_params

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

    from search.spec import StudySpec

STATE_STYLE = {  # colour and dash of each state's curves
    "COMPLETE": ("#1f77b4", "solid"),
    "PRUNED": ("#ff7f0e", "dot"),
    "BEST": ("#2ca02c", "solid"),
}
HEIGHT = 420

class Unavailable(Exception):  # noqa: N818 - a reason, shown in the report
    """This figure cannot be drawn for this study; the message says why."""

def _objective(spec: StudySpec, index: int = 0) -> tuple[str, Any]:
    """(metric name, target function) of one objective, for Optuna's plot functions."""
    return spec.objective.metric_names[index], (lambda t: t.values[index])

def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

def _need_complete(study: optuna.Study, n: int, what: str) -> None:
    have = len(_complete(study))
    if have < n:
        raise Unavailable(f"{what} needs at least {n} completed trial{'s' * (n > 1)} "
                          f"(this study has {have})")

def optimization_history(study: optuna.Study, spec: StudySpec) -> go.Figure:
    from optuna.visualization import plot_optimization_history

    _need_complete(study, 1, "the optimization history")
    if len(spec.objective.metric_names) > 1:
        name, target = _objective(spec, 0)
        fig = plot_optimization_history(study, target=target, target_name=name)
    else:
        fig = plot_optimization_history(study, target_name=spec.objective.metric_names[0])
    return fig

def pareto_front(study: optuna.Study, spec: StudySpec) -> go.Figure:
    from optuna.visualization import plot_pareto_front

    names = spec.objective.metric_names
    if not 2 <= len(names) <= 3:
        raise Unavailable(f"a Pareto front is drawn for 2 or 3 objectives, not {len(names)}")
    _need_complete(study, 1, "the Pareto front")
    return plot_pareto_front(study, target_names=list(names))

def importances(study: optuna.Study, spec: StudySpec) -> go.Figure:
    # Optuna's default evaluator (PED-ANOVA in Optuna 5) needs no scikit-learn.
    from optuna.visualization import plot_param_importances

    _need_complete(study, 2, "parameter importance")
    if len(spec.objective.metric_names) > 1:
        return plot_param_importances(study)
    return plot_param_importances(study, target_name=spec.objective.metric_names[0])

def parallel_coordinates(study: optuna.Study, spec: StudySpec) -> go.Figure:
    from optuna.visualization import plot_parallel_coordinate

    _need_complete(study, 2, "parallel coordinates")
    name, target = _objective(spec, 0)
    return plot_parallel_coordinate(study, target=target, target_name=name)

def slices(study: optuna.Study, spec: StudySpec) -> go.Figure:
    from optuna.visualization import plot_slice

    _need_complete(study, 2, "slice plots")
    name, target = _objective(spec, 0)
    return plot_slice(study, target=target, target_name=name)

def objective_curves(trials: list[optuna.trial.FrozenTrial], spec: StudySpec,
                    best: int | None) -> go.Figure:
    """Every trial's objective per epoch (validation loss with the built-in trainer); pruned
    ones stop early and end in an x."""
    import plotly.graph_objects as go

    # A user's trainer reports its own metrics: its objective's curve is the one to draw.
    metric = "val_loss" if spec.trainer is None else spec.objective.metric_names[0]
    fig = go.Figure()
    shown: set[str] = set()
    values: list[float] = []
    ordered = sorted(trials, key=lambda t: t.number == best)  # the best one drawn on top
    for t in ordered:
        history = t.user_attrs.get("history") or []
        points = [(m["epoch"], finite(m.get(metric))) for m in history]
        points = [(e, v) for e, v in points if v is not None]
        if not points:
            continue
        state = "BEST" if t.number == best else t.state.name
        color, dash = STATE_STYLE.get(state, STATE_STYLE["PRUNED"])
        x, y = zip(*points, strict=True)
        values += y
        pruned = t.state.name == "PRUNED"
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=state.lower(), legendgroup=state,
            showlegend=state not in shown,
            line={"color": color, "dash": dash, "width": 3 if state == "BEST" else 1.2},
            marker={"size": [4] * (len(x) - 1) + [9 if pruned else 4],
                    "symbol": ["circle"] * (len(x) - 1) + ["x" if pruned else "circle"]},
            opacity=1.0 if state == "BEST" else 0.6,
            hovertemplate=(f"trial #{t.number} ({t.state.name}: "
                           f"{t.user_attrs.get('ended', '')})<br>epoch %{{x}}: "
                           f"{metric} %{{y:.4g}}<extra></extra>"),
        ))
        shown.add(state)
    if not values:
        raise Unavailable(f"no trial recorded {metric}")
    positive = [v for v in values if v > 0]
    log = bool(positive) and len(positive) == len(values) and max(values) / min(positive) > 30
    fig.update_layout(
        title=f"{metric} per epoch (pruned trials end in an x)", height=HEIGHT,
        xaxis={"title": "epoch", "range": [0.8, spec.budget.epochs + 0.2], "dtick": 1
               if spec.budget.epochs <= 20 else None},
        yaxis={"title": metric, "type": "log" if log else "linear"},
    )
    return fig

def _axis(name: str, values: list[Any]) -> dict[str, Any]:
    """Log axes for lr-like knobs, categories for a small grid that includes 0."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    if len(numbers) < len(values) or (len(set(values)) <= 8 and min(numbers) <= 0):
        return {"title": name, "type": "category"}
    if min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
        return {"title": name, "type": "log"}
    return {"title": name}

def pair(trials: list[optuna.trial.FrozenTrial], spec: StudySpec, x: str, y: str
         ) -> go.Figure:
    """Two knobs against each other, coloured by the objective (pruned trials in grey)."""
    import plotly.graph_objects as go

    metric = spec.objective.metric_names[0]
    rows = []
    for t in trials:
        params = flat_params(spec, t)
        if x in params and y in params:
            rows.append((t, params[x], params[y]))
    if len(rows) < 2:
        raise Unavailable(f"needs trials that sample both {x} and {y} (found {len(rows)})")
    fig = go.Figure()
    done = [(t, a, b) for t, a, b in rows if t.state.name == "COMPLETE"]
    cut = [(t, a, b) for t, a, b in rows if t.state.name != "COMPLETE"]
    if cut:
        fig.add_trace(go.Scatter(
            x=[a for _, a, _ in cut], y=[b for _, _, b in cut], mode="markers", name="pruned",
            marker={"color": "#bbbbbb", "symbol": "x", "size": 8},
            text=[f"trial #{t.number}: {t.user_attrs.get('ended', '')}" for t, _, _ in cut],
            hovertemplate="%{text}<br>" + f"{x} %{{x}}<br>{y} %{{y}}<extra></extra>"))
    if done:
        reverse = spec.objective.direction_names[0] == "minimize"  # better = brighter
        fig.add_trace(go.Scatter(
            x=[a for _, a, _ in done], y=[b for _, _, b in done], mode="markers",
            name="complete",
            marker={"color": [t.values[0] for t, _, _ in done], "colorscale": "Viridis",
                    "reversescale": reverse, "size": 11, "showscale": True,
                    "colorbar": {"title": {"text": metric}}, "line": {"width": 0.5}},
            text=[f"trial #{t.number}: {metric} {t.values[0]:.4g}" for t, _, _ in done],
            hovertemplate="%{text}<br>" + f"{x} %{{x}}<br>{y} %{{y}}<extra></extra>"))
    fig.update_layout(title=f"{x} x {y}", height=HEIGHT,
                      xaxis=_axis(x, [a for _, a, _ in rows]),
                      yaxis=_axis(y, [b for _, _, b in rows]),
                      legend={"orientation": "h", "y": -0.2})
    return fig

def trial_curves(trial: optuna.trial.FrozenTrial, spec: StudySpec) -> go.Figure:
    """One trial's loss, accuracy, lr and per-layer gradient norms per epoch."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    history = trial.user_attrs.get("history") or []
    if not history:
        raise Unavailable(f"trial #{trial.number} recorded no history")
    epochs = [m["epoch"] for m in history]
    if spec.trainer is not None:  # a user's trainer: whatever it reported, a panel each
        names = list(dict.fromkeys(k for m in history for k in m if k != "epoch"))[:4]
        fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
        for col, name in enumerate(names, 1):
            fig.add_trace(go.Scatter(x=epochs, y=[finite(m.get(name)) for m in history],
                                     name=name, mode="lines+markers"), row=1, col=col)
        fig.update_xaxes(title_text="epoch")
        fig.update_layout(height=HEIGHT, title=f"Trial #{trial.number}: "
                                               f"{trial.user_attrs.get('ended', '')}")
        return fig
    fig = make_subplots(rows=2, cols=2, subplot_titles=(
        "loss", "accuracy", "lr (end of each epoch)", "gradient norm per layer (log)"))
    for col, what in ((1, "loss"), (2, "accuracy")):
        for split, color in (("train", "#1f77b4"), ("val", "#ff7f0e")):
            fig.add_trace(go.Scatter(
                x=epochs, y=[finite(m.get(f"{split}_{what}")) for m in history],
                name=f"{split} {what}", mode="lines+markers", line={"color": color}),
                row=1, col=col)
    fig.add_trace(go.Scatter(x=epochs, y=[finite(m.get("lr")) for m in history], name="lr",
                             mode="lines+markers", line={"color": "#9467bd"}), row=2, col=1)
    layers = list(history[0].get("grad_norms") or {})
    for layer in layers:
        fig.add_trace(go.Scatter(
            x=epochs, name=layer, mode="lines+markers",
            y=[finite((m.get("grad_norms") or {}).get(layer)) for m in history]),
            row=2, col=2)
    fig.update_yaxes(type="log", row=2, col=2)
    fig.update_yaxes(rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="epoch", range=[0.8, spec.budget.epochs + 0.2],
                     dtick=1 if spec.budget.epochs <= 20 else None)
    fig.update_layout(height=2 * HEIGHT - 80,
                      title=f"Trial #{trial.number}: {trial.user_attrs.get('ended', '')}")
    return fig
