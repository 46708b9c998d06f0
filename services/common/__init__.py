"""services/common package."""
