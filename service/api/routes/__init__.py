"""Routes: parse, call one InferenceService method, return."""
