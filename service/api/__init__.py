"""HTTP layer: the app factory, dependencies, error bodies, middleware and routes."""
