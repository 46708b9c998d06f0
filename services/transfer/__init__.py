"""services/transfer package."""
