"""Column schema and normalisation, in-memory tables, and chunked file readers."""
