"""Long-context evaluation: task generators (tasks, needles, synthetic), their examples and scores."""
