"""Shoal's HTTP side: the API, the status views and the balancer."""
