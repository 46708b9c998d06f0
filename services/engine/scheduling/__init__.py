"""Scheduling: which requests run in a step, chunked prefill, preemption, reservations."""
