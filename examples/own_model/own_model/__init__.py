"""A user's own project, tuned by hpsearch: its network (`nets`) and its data (`data`)."""
