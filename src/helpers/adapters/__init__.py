"""Adapters: the local and the AWS implementation of each port."""
