#!/usr/bin/env python3
"""`make lock`: refresh every pin of Ferry's supply chain, in one go.

1. The Python lock files in locks/, from pyproject.toml, with uv (`uv pip compile --generate-hashes`):

     locks/cpu-dev.txt   base dependencies + the dev extra, torch's CPU build   (`make install`)
     locks/cpu.txt       base dependencies, torch's CPU build                   (docker/Dockerfile.cpu)
     locks/gpu-dev.txt   base + gpu + dev extras, PyPI's CUDA torch             (Dockerfile.gpu, dev stage)
     locks/gpu.txt       base + gpu extra, PyPI's CUDA torch                    (docker/Dockerfile.gpu)

   Each pins every package, Ferry's build requirements included (install.sh builds Ferry without build
   isolation), with the sha256 of every file PyPI has for that version. cpu-dev.txt is resolved first;
   the others are constrained to its versions, so what `make test` tests is what the images ship. The GPU
   locks leave out `onnxruntime` (onnxruntime-gpu installs the same module). Resolution targets CPython
   3.11 on Linux (manylinux_2_28); a universal resolution checks that nothing differs between x86_64 and
   aarch64, which the CPU image is also built for.

   torch's CPU build (`2.13.0+cpu`) is not on PyPI. It is resolved from PyTorch's CPU index
   (TORCH_CPU_PAGE, its page of torch files) when that is reachable, otherwise from pip's configured
   --find-links (a local wheel directory). Hashes for torch files that the source at hand does not list
   are carried forward from the previous lock while the torch version is unchanged.

2. The base images of docker/Dockerfile.cpu and docker/Dockerfile.gpu: each `FROM image:tag` (the tag
   expanded with the global ARGs' defaults) is looked up in its registry (the registry's HTTP API, an
   anonymous pull token) and rewritten as `FROM image:tag@sha256:...`. locks/images.txt records every
   image with its digest, or `unresolved` and why. A digest that cannot be looked up again is kept when
   images.txt shows it was resolved for the same tag.

Writes only files whose content changes. Exit status 1 when some image is left unpinned (everything else
is still written). Settings (environment): TORCH_VERSION (2.13.0), TORCH_CPU_PAGE, UV (a uv binary to use
instead of bootstrapping the pinned one), UV_DEFAULT_INDEX and the other UV_* settings of uv itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import venv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "locks"
IMAGES = LOCKS / "images.txt"
DOCKERFILES = (ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu")
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")
TORCH_CPU_PAGE = os.environ.get("TORCH_CPU_PAGE", "https://download.pytorch.org/whl/cpu/torch/")

# The lock tool itself, pinned by hash (PyPI's wheels of uv 0.13.9 for Linux x86_64/aarch64 and macOS).
UV_REQUIREMENT = """\
uv==0.13.9 \\
    --hash=sha256:d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19 \\
    --hash=sha256:2c45530751517d6c3bbc69a19473f6effe47cce047bede01ffd8af7ea7b36b25 \\
    --hash=sha256:5435c5ce14a56431208ca0996416d310f1598e8c2c8ba707688985a16bb82dbe \\
    --hash=sha256:ecb6028d79dc96fbeafffe5c8af62a7099487ebc05a701e76714eebcffd06375 \\
    --hash=sha256:c16ed11e013557536b3e60065f1b912f6407bd6518e041b961e23ef9e6b4fbf5 \\
    --hash=sha256:66c512266d633bef48384a1f53003f41f2a8e7b36fe6e7fbfd3e0fd52d96fa63
"""


@dataclass(frozen=True)
class Lock:
    name: str
    extras: tuple[str, ...]
    gpu: bool
    constrained_by: str | None
    purpose: str

    @property
    def path(self) -> Path:
        return LOCKS / f"{self.name}.txt"


# In resolution order: each is constrained to the versions of the one named before it.
PYTHON_LOCKS = (
    Lock("cpu-dev", ("dev",), False, None, "`make install` (FERRY_EXTRAS=dev, the default)"),
    Lock("cpu", (), False, "cpu-dev", "docker/Dockerfile.cpu (FERRY_EXTRAS='')"),
    Lock("gpu-dev", ("dev", "gpu"), True, "cpu-dev", "Dockerfile.gpu's dev stage (FERRY_EXTRAS=dev,gpu)"),
    Lock("gpu", ("gpu",), True, "gpu-dev", "docker/Dockerfile.gpu (FERRY_EXTRAS=gpu)"),
)

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)
TORCH_BLOCK = re.compile(
    r"^torch==(?P<version>\S+) \\\n(?P<hashes>(?:[ \t]+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", re.MULTILINE
)
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def log(message: str) -> None:
    print(f"lock: {message}", file=sys.stderr, flush=True)


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless the file holds it already (an unchanged lock keeps `make install` quiet)."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


# Python locks ------------------------------------------------------------------------------------


def bootstrap_uv(tmp: Path) -> str:
    if os.environ.get("UV"):
        return os.environ["UV"]
    env = tmp / "uv-env"
    venv.create(env, with_pip=True)
    requirement = tmp / "uv.txt"
    requirement.write_text(UV_REQUIREMENT)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--require-hashes", "--only-binary", ":all:", "-r", str(requirement)], check=True)
    return str(env / "bin" / "uv")


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):  # noqa: S310
            return True
    except (OSError, ValueError):
        return False


def pip_find_links() -> list[str]:
    """The --find-links locations pip is configured with here (environment and config files)."""
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    for match in re.finditer(r"^\S*find-links='(.*)'$", listed, re.MULTILINE):
        found += match.group(1).split()
    return list(dict.fromkeys(found))


def torch_sources() -> list[str]:
    if reachable(TORCH_CPU_PAGE):
        return [TORCH_CPU_PAGE]
    local = pip_find_links()
    log(f"{TORCH_CPU_PAGE} is unreachable; torch's CPU build from pip's find-links: {local or 'none'}")
    return local


def pins(text: str) -> dict[str, str]:
    return {name.lower().replace("_", "-"): version for name, version in PIN.findall(text)}


def build_requirements() -> list[str]:
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"])


def header(lock: Lock) -> str:
    torch = f"torch {TORCH_VERSION}" + ("" if lock.gpu else "+cpu")
    extras = " + ".join(["base dependencies", *(f"the {e} extra" for e in lock.extras)])
    return (
        f"# locks/{lock.name}.txt: {extras} of pyproject.toml, {torch}, and Ferry's build requirements.\n"
        f"# For {lock.purpose}: scripts/install.sh installs it with pip --require-hashes.\n"
        "# Written by `make lock` (scripts/lock.py); do not edit. Resolved for CPython 3.11 on Linux\n"
        "# (manylinux_2_28, x86_64; aarch64 resolves alike). Each pin carries the hashes of every file\n"
        "# of that version on PyPI; torch's CPU build those of PyTorch's CPU index (at least cp311 x86_64\n"
        "# and aarch64).\n"
    )


def carry_torch_hashes(new: str, old: str | None) -> str:
    """Add the previous lock's torch hashes when it pins the same torch (a source that lists fewer files,
    such as a local wheel directory, must not drop the hashes of the other platforms' wheels)."""
    if not old:
        return new
    new_block, old_block = TORCH_BLOCK.search(new), TORCH_BLOCK.search(old)
    if not new_block or not old_block or new_block["version"] != old_block["version"]:
        return new
    hashes = sorted(set(HASH.findall(new_block["hashes"])) | set(HASH.findall(old_block["hashes"])))
    lines = " \\\n".join(f"    --hash=sha256:{h}" for h in hashes)
    return new[: new_block.start()] + f"torch=={new_block['version']} \\\n{lines}\n" + new[new_block.end() :]


def compile_lock(uv: str, lock: Lock, tmp: Path, find_links: list[str], done: dict[str, str]) -> str:
    torch = f"torch=={TORCH_VERSION}" if lock.gpu else f"torch=={TORCH_VERSION}+cpu"
    args = [uv, "pip", "compile", "pyproject.toml", "-", "--quiet", "--no-header", "--generate-hashes"]
    args += ["--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM]
    for extra in lock.extras:
        args += ["--extra", extra]
    if not lock.gpu:
        for link in find_links:
            args += ["--find-links", link]
    if lock.gpu:
        override = tmp / "no-cpu-onnxruntime.txt"
        override.write_text("onnxruntime ; sys_platform == 'never'\n")
        args += ["--override", str(override)]
    if lock.constrained_by:
        constraint = tmp / f"{lock.name}.constraints.txt"
        versions = pins(done[lock.constrained_by])
        versions.pop("torch", None)  # the CPU and the CUDA build differ; everything else must not
        constraint.write_text("".join(f"{n}=={v}\n" for n, v in sorted(versions.items())))
        args += ["--constraint", str(constraint)]
    out = tmp / f"{lock.name}.txt"
    args += ["-o", str(out)]
    stdin = "\n".join([torch, *build_requirements()]) + "\n"
    subprocess.run(args, input=stdin, text=True, cwd=ROOT, check=True)
    body = out.read_text()
    if lock.constrained_by:  # the annotations name the constraints by the lock they come from
        body = body.replace(str(tmp / f"{lock.name}.constraints.txt"), f"locks/{lock.constrained_by}.txt")
    old = lock.path.read_text() if lock.path.exists() else None
    return header(lock) + carry_torch_hashes(body, old)


def check_arches_alike(uv: str, find_links: list[str]) -> None:
    """The locks are resolved for x86_64; the CPU image is built for aarch64 too. A universal resolution
    shows every platform marker: none may depend on the machine."""
    args = [uv, "pip", "compile", "pyproject.toml", "-", "--quiet", "--no-header", "--universal"]
    args += ["--python-version", PYTHON_VERSION, "--no-annotate", "--extra", "dev"]
    for link in find_links:
        args += ["--find-links", link]
    stdin = f"torch=={TORCH_VERSION}+cpu\n"
    result = subprocess.run(args, input=stdin, text=True, cwd=ROOT, capture_output=True, check=True)
    machine = [line for line in result.stdout.splitlines() if "platform_machine" in line]
    if machine:
        raise SystemExit("lock: these pins depend on the machine; lock aarch64 apart:\n" + "\n".join(machine))


def lock_python() -> None:
    with tempfile.TemporaryDirectory(prefix="ferry-lock-") as name:
        tmp = Path(name)
        uv = bootstrap_uv(tmp)
        find_links = torch_sources()
        done: dict[str, str] = {}
        for lock in PYTHON_LOCKS:
            done[lock.name] = compile_lock(uv, lock, tmp, find_links, done)
            state = "updated" if write_if_changed(lock.path, done[lock.name]) else "unchanged"
            log(f"{lock.path.relative_to(ROOT)}: {len(pins(done[lock.name]))} pins, {state}")
        check_arches_alike(uv, find_links)


# Base images -------------------------------------------------------------------------------------

FROM = re.compile(
    r"^(?P<lead>FROM[ \t]+(?:--\S+[ \t]+)*)(?P<ref>[^\s@]+)"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?(?P<tail>.*)$",
    re.MULTILINE | re.IGNORECASE,
)
ARG = re.compile(r"^ARG[ \t]+(\w+)(?:=(\S*))?", re.MULTILINE | re.IGNORECASE)
STAGE = re.compile(r"\bAS[ \t]+(\S+)", re.IGNORECASE)
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        """Docker's rules: a first path part with a dot, a colon or `localhost` names the registry;
        Docker Hub's official images live under `library/`."""
        name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
        else:
            registry, repository = "docker.io", name
        if registry == "docker.io" and "/" not in repository:
            repository = f"library/{repository}"
        return cls(registry, repository, tag)

    @property
    def api(self) -> str:
        host = "registry-1.docker.io" if self.registry == "docker.io" else self.registry
        return f"https://{host}"


def global_args(text: str) -> dict[str, str]:
    first_from = FROM.search(text)
    head = text[: first_from.start()] if first_from else text
    return {name: default for name, default in ARG.findall(head)}


def expand(ref: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), ref)


def image_froms(text: str) -> list[tuple[str, str, str | None]]:
    """(reference as written, reference expanded, digest) of each FROM that names an image, not a stage."""
    args, stages, out = global_args(text), set(), []
    for match in FROM.finditer(text):
        ref = match["ref"]
        if ref not in stages and ref.lower() != "scratch":
            out.append((ref, expand(ref, args), match["digest"]))
        if stage := STAGE.search(match["tail"]):
            stages.add(stage.group(1))
    return out


def pin_froms(text: str, digests: dict[str, str | None]) -> str:
    """``FROM ref[@old]`` rewritten to ``FROM ref@digest`` (or to the bare tag, with no digest known)."""
    args = global_args(text)
    stages: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        ref = match["ref"]
        if ref in stages or ref.lower() == "scratch":
            pinned = ref
        else:
            digest = digests.get(expand(ref, args))
            pinned = f"{ref}@{digest}" if digest else ref
        if stage := STAGE.search(match["tail"]):
            stages.add(stage.group(1))
        return f"{match['lead']}{pinned}{match['tail']}"

    return FROM.sub(replace, text)


def _request(url: str, method: str, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    # https, or the loopback registry of tests/ops/test_supply_chain.py
    request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310
    with urllib.request.urlopen(request, timeout=20) as response:  # noqa: S310
        return {k.lower(): v for k, v in response.headers.items()}, response.read()


def _token(challenge: str, repository: str) -> str:
    """An anonymous pull token, from the realm a 401's ``WWW-Authenticate: Bearer ...`` names."""
    scheme, _, params = challenge.partition(" ")
    fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
    if scheme.lower() != "bearer" or "realm" not in fields:
        raise RuntimeError(f"unsupported registry authentication: {challenge!r}")
    query = {"scope": fields.get("scope") or f"repository:{repository}:pull"}
    if "service" in fields:
        query["service"] = fields["service"]
    _, body = _request(f"{fields['realm']}?{urllib.parse.urlencode(query)}", "GET", {})
    document = json.loads(body)
    return str(document.get("token") or document["access_token"])


def resolve_digest(image: ImageRef, api: str | None = None) -> tuple[str, str]:
    """(digest, media type) of ``image``'s tag: the index (multi-platform) digest when there is one."""
    url = f"{api or image.api}/v2/{image.repository}/manifests/{image.tag}"
    headers = {"Accept": ", ".join(MANIFEST_TYPES)}
    try:
        got, body = _request(url, "HEAD", headers)
    except urllib.error.HTTPError as error:
        if error.code != 401:
            raise
        challenge = error.headers.get("WWW-Authenticate", "")
        headers["Authorization"] = f"Bearer {_token(challenge, image.repository)}"
        got, body = _request(url, "HEAD", headers)
    digest = got.get("docker-content-digest")
    if not digest:  # not every registry sends it on HEAD: hash the manifest itself
        got, body = _request(url, "GET", headers)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if not DIGEST.match(digest):
        raise RuntimeError(f"unexpected digest {digest!r}")
    return digest, got.get("content-type", "").split(";")[0]


def read_images() -> dict[str, str]:
    """locks/images.txt as {expanded reference: digest or 'unresolved'}."""
    if not IMAGES.exists():
        return {}
    lines = IMAGES.read_text().splitlines()
    rows = (line.split() for line in lines if line.strip() and not line.startswith("#"))
    return {row[0]: row[1] for row in rows if len(row) >= 2}


def images_text(rows: Iterable[tuple[str, str, str]]) -> str:
    lines = [
        "# Base images of docker/Dockerfile.cpu and docker/Dockerfile.gpu (tags expanded with the ARG",
        "# defaults), pinned by digest in their FROM lines. Written by `make lock` (scripts/lock.py); do",
        "# not edit. `unresolved`: the registry could not be reached where the lock was last refreshed, and",
        "# that FROM stays on its tag until `make lock` runs where it can be.",
        "#",
        "# image  digest  note",
    ]
    lines += [f"{ref}  {digest}  {note}".rstrip() for ref, digest, note in rows]
    return "\n".join(lines) + "\n"


def lock_images() -> list[str]:
    """Pin every FROM; the images left unpinned, with why."""
    previous = read_images()
    texts = {path: path.read_text() for path in DOCKERFILES}
    refs = sorted({expanded for text in texts.values() for _, expanded, _ in image_froms(text)})
    written_digests = {e: d for text in texts.values() for _, e, d in image_froms(text) if d}
    digests: dict[str, str | None] = {}
    rows, unpinned = [], []
    for ref in refs:
        try:
            digest, media_type = resolve_digest(ImageRef.parse(ref))
            digests[ref] = digest
            rows.append((ref, digest, media_type))
            log(f"{ref}: {digest}")
        except Exception as error:  # any failure leaves this image unpinned and says why
            reason = f"{ImageRef.parse(ref).api}: {error}".replace("\n", " ")
            kept = written_digests.get(ref)
            if kept and previous.get(ref) == kept:
                digests[ref] = kept
                rows.append((ref, kept, f"kept: could not look it up again ({reason})"))
                log(f"{ref}: kept {kept}; could not look it up again: {reason}")
            else:
                digests[ref] = None
                rows.append((ref, "unresolved", reason))
                unpinned.append(f"{ref} ({reason})")
                log(f"{ref}: UNRESOLVED: {reason}")
    for path, text in texts.items():
        write_if_changed(path, pin_froms(text, digests))
    write_if_changed(IMAGES, images_text(rows))
    return unpinned


def main(argv: list[str]) -> int:
    if "--images-only" not in argv:
        lock_python()
    if "--python-only" in argv:
        return 0
    unpinned = lock_images()
    if unpinned:
        log("left unpinned (their FROM stays on the tag): " + "; ".join(unpinned))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
