"""One serializer per output format: `html` (the report, comparisons) and `markdown` (summaries)."""
