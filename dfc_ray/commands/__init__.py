"""The dfc-ray command line: one module per command group; dfc_ray/cli.py registers them."""
