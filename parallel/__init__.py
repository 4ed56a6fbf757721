"""tokenloom.parallel: schedules, runtimes and the public sequence-parallel attention API."""
