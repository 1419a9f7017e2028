"""Training: state, the pure step, compiled programs, run setup, hooks and the loop."""
