"""No-op Flower app: measures the Deployment Engine's per-round floor."""
