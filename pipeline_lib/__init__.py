"""RLHF stages as plain functions: config, data, models, stages, store, tracking. No Prefect here."""
