"""tokenloom.launch: the one SPMD entry, called the same way by torchrun, Ray, local ranks and scripts."""
