"""Built-in synthetic verifiable tasks (problems, worked solutions, verifier, splits)."""
