"""`baton up --sim-prefills N --sim-decodes M`: the real router in front of simulated workers.

One `baton serve sim` process runs every simulated worker (services/sim: the real prefill
and decode gRPC protocol, health, load reports and KV events, a timing model instead of a
model), writing their addresses to a file in the run directory; then the real router
(`baton router`) starts in front of them, exactly as `baton up` starts it in front of real
workers (same key, secret and failover flags). The router's tokenizer is the engine's model
(the embedded SmolLM2 by default): the gateway needs one to turn text into token ids; the
simulated workers answer with deterministic ids and texts ` t<id>`.
"""
from __future__ import annotations

import json
import time

from baton.deploy.launcher import Cluster
from baton.services.common.server import free_port
from baton.services.engine.engine_setup import resolve_model_path


class SimulatedCluster(Cluster):
    """A `baton up` whose workers are simulated, all in one child process."""

    def start(self) -> str:
        """Start the simulated workers, then the router; returns the gateway's URL."""
        up = self.up
        model = str(resolve_model_path(self.engine))
        secret = self._secret_flags()
        address_file = self._private_file("sim-addresses.json", "")
        self._spawn("sim", ["serve", "sim", "--sim-prefills", str(up.sim_prefills), "--sim-decodes",
                            str(up.sim_decodes), "--sim-address-file", address_file, "--host", up.host,
                            "--metrics-port", "-1", *secret])
        deadline = time.monotonic() + up.startup_timeout_s
        addresses = self._wait_addresses(address_file, deadline)
        http_port = up.port or free_port(up.host)
        self._spawn("router", ["router", "--model", model, "--host", up.host, "--http-port", str(http_port),
                               "--grpc-port", str(up.grpc_port), "--prefill", ",".join(addresses["prefill"]),
                               "--decode", ",".join(addresses["decode"]), *self._key_flags(), *secret,
                               "--decode-only-threshold", str(up.decode_only_threshold),
                               "--max-queued-requests", str(up.router_max_queued_requests),
                               *self._router_processes(http_port), *self._failover_flags()],
                    {"CUDA_VISIBLE_DEVICES": ""})
        self.gateway_url = f"http://{up.host}:{http_port}"
        self._wait_http(self.gateway_url + "/health", deadline)
        return self.gateway_url

    def _wait_addresses(self, path: str, deadline: float) -> dict[str, list[str]]:
        """The simulated workers' addresses, once their process has written them."""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                text = open(path).read()
            except OSError:
                text = ""
            if text.strip():
                return json.loads(text)
            time.sleep(0.1)
        raise TimeoutError("the simulated workers did not start in time")
