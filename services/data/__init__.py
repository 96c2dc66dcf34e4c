"""Data sets that generators and scorers both read (layer 0: imports nothing else of services)."""
