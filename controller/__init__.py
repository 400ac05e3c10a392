"""Shoal's controller: policy, autoscaler, reconciler, runtimes, registry, queue, dispatcher."""
