"""Developer scripts: the dev stack (`make run`) and the generated configuration reference."""
