"""services/decode package."""
