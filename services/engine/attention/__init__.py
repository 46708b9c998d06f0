"""services/engine/attention package."""
