"""Ports: the interfaces (and their errors) that services use and that `helpers.infra`
implements, once per backend."""
