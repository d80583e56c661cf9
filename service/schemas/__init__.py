"""Wire models of each protocol (pydantic only): documentation and cold paths, never the hot path."""
