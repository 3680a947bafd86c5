"""Long-context evaluation: task generators (tasks, needles, synthetic), examples, scores."""
