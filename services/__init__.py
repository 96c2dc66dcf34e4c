"""NormGuard services: config, generators, reward scorers, Ray actors, Tune, Serve and the CLI."""
