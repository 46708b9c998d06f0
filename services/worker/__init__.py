"""The worker shell: the engine thread, run-time state, wire codecs, config and the main of a worker process."""
