"""services/prefill package."""
