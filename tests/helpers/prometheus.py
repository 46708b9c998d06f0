"""A real Prometheus server for tests: Debian's `prometheus` binary on a free loopback port
with a config derived from deploy/prometheus/prometheus.yml, and a small client of its HTTP
API. `.ci/run` installs the package where it is missing; without it the tests that need it skip."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from baton.services.common.server import free_port
from tests.helpers.workers import REPO

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "baton.json"
METRIC_NAME = re.compile(r"\b((?:baton_|baton:)[a-zA-Z0-9_:]+|up)\b(?!\s*\()")
MISSING = "Debian's `prometheus` package is not installed (.ci/run installs it as root: apt-get install prometheus)"


def binary(name: str = "prometheus") -> str:
    """Path of `prometheus` or `promtool`, or '' when the package is missing."""
    return shutil.which(name) or ""


class Prometheus:
    """One Prometheus process scraping `targets_file` every second, with Baton's rules loaded."""

    def __init__(self, folder: Path, targets_file: Path) -> None:
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
        config["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = folder / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary(), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address={self.url[len('http://'):]}"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready:\n" + self.log.read_text()[-3000:])

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/PATH; returns `data`, raising AssertionError with Prometheus's error otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read())
        assert body["status"] == "success", f"{params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector `expr` evaluates to now (an error fails the test with Prometheus's message)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def finite(result: list[dict]) -> list[float]:
    """The finite sample values of an instant-vector result."""
    return [v for v in (float(s["value"][1]) for s in result) if math.isfinite(v)]


def dashboard_expressions(rate_interval: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the Grafana dashboard, Grafana's `$__rate_interval`
    replaced by `rate_interval`."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"].replace("$__rate_interval", rate_interval))
            for p in panels for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    """Every alerting rule of deploy/prometheus/baton-rules.yml."""
    groups = yaml.safe_load((PROMETHEUS_DIR / "baton-rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


ALERT_FORM = re.compile(r"^(?P<signal>.+?)\s*(?P<op>>|<|>=|<=|==|!=)\s*(?P<threshold>[0-9.e+-]+)\s*$", re.S)


def alert_signal(expr: str) -> str:
    """The SIGNAL of an alert written as `SIGNAL OP THRESHOLD` (the rules file's convention)."""
    match = ALERT_FORM.match(" ".join(expr.split()))
    assert match, f"alert expression not of the form SIGNAL OP THRESHOLD: {expr}"
    return match["signal"]


def metric_names(expr: str) -> set[str]:
    """Series names an expression reads (baton_* / baton:* and up), function names excluded."""
    return {name for name in METRIC_NAME.findall(expr)}
