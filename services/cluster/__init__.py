"""Cluster: the placement plan (actors vs nodes) and Ray job submission."""
