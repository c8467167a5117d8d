"""What a run will cost before it runs: the task size from a measured generator, and `unidask plan`."""
