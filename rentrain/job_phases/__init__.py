"""A job's phases, each one job: provision, prepare, follow, fetch, teardown; rentrain.job composes them."""
