"""Build the carry bundle for a bare GPU machine: the wheels it lacks, the data the suite reads, a setup script.

    python -m bench.gpu_bundle                       # -> .gpu-bundle/ (what `make gpu-bundle` runs)
    python -m bench.gpu_bundle --python-version 3.11 --out /tmp/b   # wheels for this machine's Python

The machine has Python 3.12 with PyTorch, torchvision, numpy, scipy and DeepSpeed's other
needs, but not deepspeed, tensorly, hjson or pydantic, and it cannot download. The bundle holds:

    wheels/    tdcompress (this tree, pure Python), deepspeed (built here: `pip wheel --no-deps`, no ops
               compiled: it JIT-builds what it needs), tensorly, hjson, pydantic, pydantic_core (the one
               compiled wheel: --python-version, manylinux x86_64), annotated_types, typing_inspection,
               typing_extensions; each at the version installed here, so the device runs what the tests ran
    data/      cifar10/{train,test}.npz (from TDC_DATA_ROOT) and imagenet-sample/val/ (the first
               --imagenet-images classes of TDC_IMAGENET_SAMPLE and its grayscale JPEGs)
    setup.sh   source it from the repository root: installs the wheels into $TDC_BUNDLE_SITE
               (/tmp/tdc-site) with pip --no-index --no-deps, exports PYTHONPATH (the tree first),
               TDC_DATA_ROOT, TDC_IMAGENET_SAMPLE and DS_ACCELERATOR, and checks the imports
    manifest.json  every file with its size and sha256, the target Python, the commit

``--wheels-from installed`` packs the third-party wheels from this environment's installed files
instead (offline; for this machine's Python only): the test suite builds its bundle that way.

Ray and MLflow are not in it (the suite and the GPU tests need neither; Ray's wheel alone is over
the 64 MiB a device call carries). Downloaded and built wheels are kept in --cache, so a rebuild
needs the network only for a version not seen before. The build fails when the bundle and the
working tree (which travels with it) exceed --limit-mib together.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tdcompress-gpu-bundle"
# Installed here, missing there; pinned to the versions installed here (read at build time).
DOWNLOADED = ("tensorly", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
              "typing_extensions")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 64.0  # what one device call carries, working tree included


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def _cached(cache: Path, name: str, version: str, python_version: str) -> Path | None:
    """The wheel of ``name==version`` in ``cache`` that installs on ``python_version``, if any."""
    tag = "cp" + python_version.replace(".", "")
    for whl in sorted(cache.glob("*.whl")):
        dist, ver, *tags = whl.stem.split("-")
        if _norm(dist) == _norm(name) and ver == version and (tags[0] in ("py3", tag) or tags[0].startswith("py2.py3")):
            return whl
    return None


def fetch_wheels(cache: Path, python_version: str) -> list[Path]:
    """Every third-party wheel of the bundle, from ``cache`` or fetched into it."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name in DOWNLOADED:
        version = metadata.version(name)
        whl = _cached(cache, name, version, python_version)
        if whl is None:
            platforms = [a for p in PLATFORMS for a in ("--platform", p)]
            _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                 "--implementation", "cp", *platforms, "-d", str(cache), f"{name}=={version}")
            whl = _cached(cache, name, version, python_version)
            if whl is None:
                raise SystemExit(f"pip download {name}=={version} gave no wheel for Python {python_version} in {cache}")
        wheels.append(whl)
    version = metadata.version("deepspeed")
    whl = _cached(cache, "deepspeed", version, python_version)
    if whl is None:
        # Built here without its ops (DS_BUILD_OPS=0): a small pure-Python wheel; --no-build-isolation so the
        # build sees this venv's torch instead of downloading one.
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(cache), f"deepspeed=={version}",
             env={"DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cpu"})
        whl = _cached(cache, "deepspeed", version, python_version)
        if whl is None:
            raise SystemExit(f"pip wheel deepspeed=={version} gave no py3 wheel in {cache}")
    wheels.append(whl)
    return wheels


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack_installed(name: str, dest: Path) -> Path:
    """A wheel of the installed distribution ``name`` from its own files (its RECORD), tagged as it was installed.

    Scripts outside site-packages and bytecode are left out; RECORD is rewritten for the files kept."""
    dist = metadata.distribution(name)
    info = dist.read_text("WHEEL") or ""
    tag = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("Tag:")), None)
    if tag is None:
        raise SystemExit(f"{name}: its installed WHEEL file names no tag; cannot repack it")
    base = Path(dist.locate_file(""))
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in f.parts
             and f.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")]
    record_name = next(str(f.parent / "RECORD") for f in dist.files or [] if f.name == "METADATA")
    whl = dest / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{tag}.whl"
    rows = []
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            data = (base / f).read_bytes()
            z.writestr(str(f), data)
            rows.append(f"{f},{_record_hash(data)},{len(data)}")
        z.writestr(record_name, "\n".join(rows + [f"{record_name},,"]) + "\n")
    return whl


def project_wheel(dest: Path) -> Path:
    """This tree as a wheel (launcher, cluster, trainer, admm, the configs)."""
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(ROOT))
    found = sorted(dest.glob("tdcompress-*.whl"))
    if not found:
        raise SystemExit(f"pip wheel {ROOT} wrote no tdcompress wheel into {dest}")
    return found[-1]


def copy_data(dest: Path, cifar: Path, imagenet: Path, imagenet_images: int) -> None:
    missing = [str(cifar / f) for f in ("train.npz", "test.npz") if not (cifar / f).is_file()]
    if missing:
        raise SystemExit(f"packed CIFAR-10 not found: {missing} (set TDC_DATA_ROOT or --cifar)")
    if not imagenet.is_dir():
        raise SystemExit(f"ImageNet sample not found: {imagenet} (set TDC_IMAGENET_SAMPLE or --imagenet)")
    (dest / "cifar10").mkdir(parents=True)
    for f in ("train.npz", "test.npz"):
        shutil.copy2(cifar / f, dest / "cifar10" / f)
    classes = sorted(d for d in imagenet.iterdir() if d.is_dir())
    # The grayscale JPEGs too, wherever they are: the loader's tests need that real quirk of the data.
    chosen = classes[:imagenet_images or None] + [d for d in classes[imagenet_images or len(classes):] if _gray(d)]
    for d in chosen:
        shutil.copytree(d, dest / "imagenet-sample" / "val" / d.name)


def _gray(class_dir: Path) -> bool:
    from PIL import Image

    for f in class_dir.iterdir():
        with Image.open(f) as im:  # reads the header only
            if im.mode == "L":
                return True
    return False


SETUP = r"""# Source from the repository root on the GPU machine:  . {bundle}/setup.sh
# Installs the bundle's wheels (no index, no dependencies resolved: the image has the rest) and exports
# what bench.gpu_suite needs. TDC_BUNDLE_PYTHON / TDC_BUNDLE_SITE override the interpreter and the target.
_tdc_b="$(cd "$(dirname "${{BASH_SOURCE[0]:-$0}}")" && pwd)"
_tdc_py="${{TDC_BUNDLE_PYTHON:-python3}}"
export TDC_BUNDLE_SITE="${{TDC_BUNDLE_SITE:-/tmp/tdc-site}}"
"$_tdc_py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$TDC_BUNDLE_SITE" "$_tdc_b"/wheels/*.whl || return 1 2>/dev/null || exit 1
export PYTHONPATH="$PWD:$TDC_BUNDLE_SITE${{PYTHONPATH:+:$PYTHONPATH}}"
export TDC_DATA_ROOT="$_tdc_b/data/cifar10" TDC_IMAGENET_SAMPLE="$_tdc_b/data/imagenet-sample/val"
export DS_ACCELERATOR="${{DS_ACCELERATOR:-$("$_tdc_py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}}"
"$_tdc_py" -c "import deepspeed, tensorly, hjson, pydantic, trainer.core.engine, admm.admm_component; print('bundle ok:', 'deepspeed', deepspeed.__version__, 'tensorly', tensorly.__version__, 'from', '$TDC_BUNDLE_SITE')" \
    || return 1 2>/dev/null || exit 1
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_bytes() -> int:
    """Bytes of what a device call sends besides the bundle: tracked and untracked-but-not-ignored files."""
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True)
    return sum((ROOT / f).stat().st_size for f in res.stdout.decode().split("\0") if f and (ROOT / f).is_file())


def build(out: Path, python_version: str, cache: Path, cifar: Path, imagenet: Path, imagenet_images: int,
          limit_mib: float, wheels_from: str = "index") -> dict:
    """Write the bundle into ``out`` (replaced); return its manifest. ``wheels_from``: "index" (download /
    build into ``cache``) or "installed" (:func:`repack_installed`, this Python only)."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if wheels_from == "installed" and python_version != here:
        raise SystemExit(f"--wheels-from installed packs this Python's packages ({here}); "
                         f"--python-version {python_version} needs --wheels-from index")
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    if wheels_from == "installed":
        for name in (*DOWNLOADED, "deepspeed"):
            repack_installed(name, out / "wheels")
    else:
        for whl in fetch_wheels(cache, python_version):
            shutil.copy2(whl, out / "wheels" / whl.name)
    project_wheel(out / "wheels")
    copy_data(out / "data", cifar, imagenet, imagenet_images)
    (out / "setup.sh").write_text(SETUP.format(bundle=os.path.relpath(out, ROOT) if out.is_relative_to(ROOT)
                                               else out))
    files = sorted(p for p in out.rglob("*") if p.is_file())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    manifest = {"python_version": python_version, "commit": commit, "wheels_from": wheels_from,
                "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    bundle = sum(f["bytes"] for f in manifest["files"].values())
    tree = tree_bytes()
    manifest.update(bundle_bytes=bundle, tree_bytes=tree, limit_mib=limit_mib)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total = (bundle + tree) / 2**20
    print(f"bundle {out}: {len(files)} files, {bundle / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} "
          f"MiB) {total:.1f} of {limit_mib:g} MiB a device call carries")
    if total > limit_mib:
        raise SystemExit(f"the bundle and the working tree come to {total:.1f} MiB, over --limit-mib {limit_mib:g}: "
                         "lower --imagenet-images")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (compiled wheels' tag)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloaded and built wheels are kept here")
    p.add_argument("--wheels-from", choices=("index", "installed"), default="index",
                   help="index: download (deepspeed: build) the wheels; installed: pack this environment's "
                        "installed packages (offline, this Python only)")
    p.add_argument("--cifar", type=Path, default=Path(os.environ.get("TDC_DATA_ROOT", ROOT.parent / "shared" /
                                                                       "data" / "cifar10")))
    p.add_argument("--imagenet", type=Path, default=Path(os.environ.get(
        "TDC_IMAGENET_SAMPLE", ROOT.parent / "shared" / "data" / "imagenet-sample" / "val")))
    p.add_argument("--imagenet-images", type=int, default=100, help="classes of the sample to carry (one JPEG "
                   "each, ~110 KB; 0: all 250)")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = p.parse_args(argv)
    if args.imagenet_images < 0:
        p.error(f"--imagenet-images must be >= 0, got {args.imagenet_images}")
    build(args.out.resolve(), args.python_version, args.cache, args.cifar, args.imagenet, args.imagenet_images,
          args.limit_mib, args.wheels_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
