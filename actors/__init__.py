"""Ray actors that host model replicas (evaluation, steering) and their pools."""
