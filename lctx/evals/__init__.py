"""Long-context evaluation: task generators (tasks, needles, synthetic) and their examples."""
