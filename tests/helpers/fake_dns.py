"""DNS failure injection for a router process (tests only): `python -m tests.helpers.fake_dns
ANSWERS.json router ...` makes the router's discovery resolver (`baton.router.discovery.resolve_dns`)
answer from a JSON file {"name": ["ip:port", ...]} re-read at every look-up, so a test can point a
headless Service name at real local workers (and change the answer while the router runs); a name
missing from the file does not exist. Then it runs the normal `baton` CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def install(answers: Path) -> None:
    from baton.router import discovery

    async def resolve(host: str, port: int) -> list[str]:
        known = json.loads(answers.read_text())
        if host not in known:
            raise discovery.NameNotFound(host)
        return list(known[host])
    discovery.resolve_dns = resolve


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    from baton.deploy.cli import main
    sys.exit(main(sys.argv[2:]))
