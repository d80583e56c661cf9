"""Model runtimes: one backend per framework behind the ``Runtime`` protocol."""
