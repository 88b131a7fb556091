"""edgefleet fleet server: ingestion, drift, alerts, registry and rollouts (see issue 4; not built yet)."""
