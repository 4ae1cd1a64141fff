"""What only the notebooks need: gallery, scoring, demo subjects, preflight checks, plots,
the load test and the base model's build."""
