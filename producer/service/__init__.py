"""docbatch as a service: beat and inbox scans, Flower, `up`, `top`, the embedded Redis."""
