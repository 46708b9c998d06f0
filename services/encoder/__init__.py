"""services/encoder package."""
