"""`python -m baton.bench.serving ...` is `baton bench ...`."""
import sys

from baton.deploy.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
