"""Simulated workers (`baton serve sim`): the real prefill and decode gRPC protocol, with a
timing model, a KV block pool with a prefix cache, KV events and failure injection in place
of a model. Many run in one process, each a small grpc.aio server on its own port."""
