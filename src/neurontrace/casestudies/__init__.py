"""Case studies: one command each, writing a report folder (markdown, plots, JSON)."""
