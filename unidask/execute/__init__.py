"""Running it: SLURM, the cluster, TLS, the workers' entry points and the driver."""
