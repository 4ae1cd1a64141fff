"""Services: onboarding, packaging and serving, written against the ports."""
