"""tokenloom.jobs: SPMD jobs (a function of a Communicator and a config dataclass) run by tokenloom.launch."""
