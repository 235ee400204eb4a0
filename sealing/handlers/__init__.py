"""State handlers, one module per phase; the state -> handler map is `graph.handlers()`."""
