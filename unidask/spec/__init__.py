"""What to make: a run's config as a typed `Spec`, its tasks and seeds, the generators and the laws
they state."""
