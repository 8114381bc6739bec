"""A user's own project, tuned by hpsearch: its own training loop (`autoencoder.fit`)."""
