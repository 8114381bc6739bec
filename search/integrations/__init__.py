"""Adapters between `search.Trial` and the training loops users already have, so that a
`trainer: pkg.module:fit` function needs no glue of its own:

- `search.integrations.huggingface.HpsearchCallback`: a `transformers.TrainerCallback`;
- `search.integrations.lightning.HpsearchCallback`: a Lightning `Callback`.

Each reports every evaluation through `Trial.report`, stops the framework's loop cleanly when
the trial is pruned or `hpsearch stop` asks (the trial still ends PRUNED, or is queued again),
and keeps the framework's checkpoints in the trial's folder so that a dead trial's retry
resumes from them. Importing this package loads neither framework; each module needs its own
(`pip install 'hpsearch[huggingface]'`, `'hpsearch[lightning]'`).
"""
