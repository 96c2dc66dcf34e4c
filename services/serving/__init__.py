"""Serving: the Ray Serve app (HTTP generation), its config, and export of trained runs."""
