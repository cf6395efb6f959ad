"""A worker's telemetry: job and engine metrics, GPU readings, alerts, the Prometheus endpoint."""
