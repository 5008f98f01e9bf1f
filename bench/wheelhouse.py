"""`python -m bench.wheelhouse DEST`: the wheels an offline GPU node lacks, downloaded on a machine that has the
internet (README "Offline GPU nodes").

What k4flash and its benchmarks need (setup.cfg's install_requires, the benchmarks' client, the build backend) is
resolved for the node's Python on manylinux x86_64, with the node's own packages (`--have`, its `pip freeze`)
pinned as constraints: so nothing the node has is replaced, and only what it lacks lands in DEST. torch is never
shipped: the node's is its CUDA build. A package PyPI has only as source (antlr4-python3-runtime 4.9.3, which
hydra-core pins) is built into a wheel here, which is why that must be pure Python.

    python -m bench.wheelhouse DEST [--python-version 3.12] [--have FREEZE.txt] [--without video]

Exit status 0, 1 when pip fails (its message on the `error:` line), 2 for bad arguments.
"""
import argparse
import configparser
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = ("torch",)  # the node's own CUDA build: a PyPI torch would replace it
# Optional parts: `--without NAME` leaves these requirements out (and so their own dependencies).
GROUPS = {
    "video": ("imageio-ffmpeg",),  # the 68 MB ffmpeg build; without it MP4s need an ffmpeg on PATH (k4flash/ffmpeg.py)
    "bench": ("openai",),  # bench.serve's client, taken from the test extras
}
BENCH_FROM_TEST_EXTRAS = ("openai",)  # the test extras' entries the benchmarks (not only the tests) import
# manylinux2014 = manylinux_2_17 (glibc 2.17), as asked of every wheel; manylinux_2_28 too because a node that runs
# torch >= 2.6's CUDA wheels (tagged manylinux_2_28) has glibc >= 2.28, and current numpy / tokenizers releases
# publish no older tag: without it the node's own pinned versions would have no candidate here.
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
MAX_BUILD_ROUNDS = 4  # source-only packages are found one conflict at a time; hydra's chain has one


class Refused(Exception):
    """Bad arguments: one `error:` line, exit status 2."""


class PipFailed(Exception):
    """pip could not resolve or fetch: one `error:` line, exit status 1."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def requirements(without=()) -> list:
    """What to resolve: setup.cfg's install_requires and every extra but `test`, the benchmarks' share of `test`,
    less torch and the groups left out."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    extras = cfg["options.extras_require"] if cfg.has_section("options.extras_require") else {}
    for extra, value in extras.items():
        lines += [line for line in value.splitlines()
                  if extra != "test" or (line.strip() and requirement_name(line) in BENCH_FROM_TEST_EXTRAS)]
    dropped = set(NOT_SHIPPED) | {canonical(n) for group in without for n in GROUPS[group]}
    found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [line for line in found if requirement_name(line) not in dropped]


def build_requirements() -> list:
    """pyproject.toml's [build-system] requires: `pip install -e .` builds in an isolated environment that sees only
    the wheelhouse, so these are shipped even when the node has them."""
    text = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r"^requires\s*=\s*\[(.*?)\]", text, re.S | re.M)
    return re.findall(r"[\"']([^\"']+)[\"']", listed.group(1)) if listed else []


def read_freeze(path: Path) -> dict:
    """`pip freeze` → {canonical name: version, or None for one installed from a URL or folder}."""
    have = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("-e") else ""
        if not line or line.startswith("-"):
            continue  # blanks, comments, editable checkouts (no name to read), pip options
        pinned = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*===?\s*(\S+)$", line)
        if pinned:
            have[canonical(pinned.group(1))] = pinned.group(2)
        elif re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*\s*@", line):
            have[requirement_name(line)] = None
        else:
            raise Refused(f"--have {path}: {raw.strip()!r} is not a `pip freeze` line (name==version or name @ url)")
    return have


def target_options(python_version: str) -> list:
    return ["--only-binary=:all:", *(f"--platform={p}" for p in PLATFORMS), f"--python-version={python_version}",
            "--implementation=cp"]


def pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True)


def pip_error(result) -> str:
    """pip's message in one line: its ERROR lines, else its last line."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    return " | ".join(errors or lines[-1:]) or f"pip exited {result.returncode}"


def resolve(wanted, target, work: Path, constraints, links) -> tuple:
    """(the packages pip would install for `wanted` on the target, or None; pip's result): a dry run, which reads
    metadata and downloads no wheel it can avoid."""
    report = work / "report.json"
    report.unlink(missing_ok=True)
    # Not --quiet: pip's "X depends on NAME==..." lines, which name a source-only package, go to stdout.
    result = pip("install", "--dry-run", "--ignore-installed", "--target", str(work / "none"),
                 "--report", str(report), *target, *(f"--find-links={d}" for d in links),
                 *(["--constraint", str(constraints)] if constraints else []), *wanted)
    if result.returncode:
        return None, result
    return [(canonical(p["metadata"]["name"]), p["metadata"]["version"])
            for p in json.loads(report.read_text())["install"]], result


def build_source_only(result, target, built: Path, tried: set) -> list:
    """Wheels built here for the requirements a failed resolution names that PyPI has as source only. pip says
    which requirement failed ("X depends on NAME==4.9.*", "No matching distribution found for NAME"); one that
    has a wheel for the target is a genuine conflict, left to fail."""
    named = re.findall(r"(?:depends on|distribution found for|satisfies the requirement) "
                       r"([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?[^\s(,]*)", result.stdout + result.stderr)
    made = []
    for requirement in dict.fromkeys(named):
        name = requirement_name(requirement)
        if name in tried:
            continue
        tried.add(name)
        with tempfile.TemporaryDirectory() as probe:  # a wheel for the target exists: not source-only
            if pip("download", "--no-deps", "--quiet", "-d", probe, *target, requirement).returncode == 0:
                continue
        before = set(built.glob("*.whl"))
        made_now = pip("wheel", "--no-deps", "--quiet", "--no-binary", name, "-w", str(built), requirement)
        wheels = sorted(set(built.glob("*.whl")) - before)
        if made_now.returncode or not wheels:
            raise PipFailed(f"{requirement} has no wheel for the node and did not build here: {pip_error(made_now)}")
        if not all(w.name.endswith("-none-any.whl") for w in wheels):
            raise PipFailed(f"{requirement} has no wheel for the node, and the one built here is not pure Python "
                            f"({wheels[0].name}); build it on a machine like the node")
        made.append(name)
    return made


def plan(wanted, target, work: Path, have: dict, built: Path) -> list:
    """The (name, version) pairs of the closure of `wanted` that the node lacks, building source-only ones."""
    constraints = None
    if have:
        constraints = work / "node-constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(have.items())
                                       if version and name not in NOT_SHIPPED))
    tried = set()
    for _ in range(MAX_BUILD_ROUNDS + 1):
        closure, result = resolve(wanted, target, work, constraints, [built])
        if closure is not None:
            return [(name, version) for name, version in closure if name not in have and name not in NOT_SHIPPED]
        if not build_source_only(result, target, built, tried):
            break
    raise PipFailed(f"no set of wheels fits the node's packages: {pip_error(result)}")


def download(pins, target, dest: Path, built: Path) -> None:
    if not pins:
        return
    result = pip("download", "--no-deps", "--quiet", "-d", str(dest), f"--find-links={built}", *target,
                 *(f"{name}=={version}" for name, version in pins))
    if result.returncode:
        raise PipFailed(f"downloading the wheels: {pip_error(result)}")


def wheelhouse(dest: Path, python_version: str, have: dict, without=()) -> dict:
    """Fill `dest` with what the node lacks; returns the summary's facts."""
    target = target_options(python_version)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work, built = Path(tmp), Path(tmp) / "built"
        built.mkdir()
        missing = plan(requirements(without), target, work, have, built)
        # The build backend unconstrained: the isolated build environment never sees the node's own copy.
        backend = plan(build_requirements(), target, work, {}, built)
        pins = sorted(dict.fromkeys(missing + [p for p in backend if p[0] not in dict(missing)]))
        download(pins, target, dest, built)
        from_source = sorted(canonical(w.name.split("-")[0]) for w in built.glob("*.whl"))
    return dict(pins=pins, left_out=sorted(n for n in have if n not in NOT_SHIPPED),
                from_source=[n for n in from_source if n in dict(pins)])


def summary(dest: Path, facts: dict, python_version: str) -> str:
    wheels = sorted(dest.glob("*.whl"), key=lambda p: p.name.lower())
    total = sum(w.stat().st_size for w in wheels)
    lines = [f"{len(wheels)} wheels for CPython {python_version} on manylinux x86_64 in {dest}, "
             f"{total / 1e6:.1f} MB:"]
    lines += [f"  {w.name}  {w.stat().st_size / 1e6:.2f} MB" for w in wheels]
    if facts["from_source"]:
        lines.append(f"built here from source (pure Python): {', '.join(facts['from_source'])}")
    if facts["left_out"]:
        lines.append(f"left out, the node has them: {', '.join(facts['left_out'])}")
    lines.append(f"not shipped: {', '.join(NOT_SHIPPED)} (the node's own build)")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line, not argparse's usage block
        raise Refused(message)


def parse_args(argv):
    parser = _Parser(prog="python -m bench.wheelhouse", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="an empty or new folder for the wheels")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the node's Python, X.Y (default: this one's)")
    parser.add_argument("--have", type=Path, help="the node's `pip freeze`: what it has is left out")
    parser.add_argument("--without", action="append", default=[], metavar="GROUP",
                        help=f"leave out an optional part: {', '.join(f'{g} ({chr(32).join(n)})' for g, n in GROUPS.items())}")
    args = parser.parse_args(argv)
    version = re.fullmatch(r"3\.(\d+)", args.python_version)
    if not version or int(version.group(1)) < 10:
        raise Refused(f"--python-version {args.python_version}: allowed is 3.10 or later, written X.Y (e.g. 3.12)")
    for group in args.without:
        if group not in GROUPS:
            raise Refused(f"--without {group}: allowed groups are {', '.join(GROUPS)}")
    if args.have is not None and not args.have.is_file():
        raise Refused(f"--have {args.have}: no such file (write it with `pip freeze > FILE` on the node)")
    if args.dest.exists() and (not args.dest.is_dir() or any(args.dest.iterdir())):
        raise Refused(f"DEST {args.dest}: must be a new or empty folder (what is in it would be installed too)")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        have = read_freeze(args.have) if args.have else {}
        facts = wheelhouse(args.dest, args.python_version, have, args.without)
    except Refused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PipFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(args.dest, facts, args.python_version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
