"""Results: run records (metrics.json), sweep summaries, the report's figures."""
