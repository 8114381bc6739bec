"""A user's own Lightning project, tuned by hpsearch: a `LightningModule` (`classifier.fit`)."""
