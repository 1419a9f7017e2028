"""Checkpoints: run folders (`runs`), run configs (`run_config`), orbax states (`orbax_states`)."""
