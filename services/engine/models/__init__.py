"""services/engine/models package."""
