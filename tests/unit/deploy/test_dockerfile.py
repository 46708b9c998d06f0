"""deploy/Dockerfile installs Baton exactly as the README does: the README's set-up commands are
`make` targets whose install step is deploy/install.sh, and the image's one install step runs
that same script (so the requirements, pins and --no-deps packages are the same by construction),
with nothing it reads left out of the build context, and no other pip step that could drift.
The chart's default image is the one the Dockerfile's header names."""
import re
import tomllib

from tests.helpers.workers import REPO

DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def test_the_readme_install_and_the_image_install_are_one_script():
    readme = (REPO / "README.md").read_text()
    assert "make up" in readme and "make test" in readme
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^install:\n\t@?bash deploy/install\.sh$", makefile, re.M)
    assert re.search(r"^up: install$", makefile, re.M) and re.search(r"^test: install$", makefile, re.M)
    runs = [args for op, args in _instructions(DOCKERFILE) if op == "RUN"]
    installs = [r for r in runs if "install.sh" in r or "pip" in r]
    assert installs == ["bash deploy/install.sh && rm -rf /root/.cache/pip"], installs


def test_the_build_context_holds_what_install_sh_reads():
    copies = [args for op, args in _instructions(DOCKERFILE) if op == "COPY"]
    assert copies == [". ."]
    ignored = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "deploy/install.sh", project["project"]["readme"],
              *project["tool"]["setuptools"]["package-dir"].values()}
    for path in needed:
        assert (REPO / path).exists(), path
        assert not any(path == i or path.startswith(i.rstrip("/") + "/") for i in ignored), (path, ignored)
    install = (REPO / "deploy" / "install.sh").read_text()
    assert '"torch==' in install and "--no-deps" in install  # the pins DESIGN asks for live there


def test_entry_point_and_the_charts_default_image():
    ops = dict(_instructions(DOCKERFILE))
    assert ops["ENTRYPOINT"] == '["baton"]' and ops["FROM"] == "${CUDA_IMAGE}"
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", DOCKERFILE, re.M)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = (REPO / "k8s/charts/baton/Chart.yaml").read_text()
    assert f'appVersion: "{version}"' in chart
    assert f"docker build -f deploy/Dockerfile -t baton:{version} ." in DOCKERFILE
    assert "repository: baton\n" in (REPO / "k8s/charts/baton/values.yaml").read_text()
