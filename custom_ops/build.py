"""Build the mgvq custom-op library for ONNX Runtime (CPU): ``python custom_ops/build.py``.

ORT's C/C++ headers are not in its Python wheels; they are taken from Debian's
``libonnxruntime-dev`` (trixie, 1.21), downloaded with a private apt configuration into
``build/ort-headers/`` (nothing is installed; the .deb's sha256 is checked). The library uses only the
OrtApi pointer handed to ``RegisterCustomOps``, so it does not link against libonnxruntime and a build
against the 1.21 headers loads in newer ORT releases.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ROOT", "BUILD_DIR", "HEADERS_DIR", "LIBRARY", "fetch_headers", "build", "main"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build"
HEADERS_DIR = BUILD_DIR / "ort-headers"
LIBRARY = BUILD_DIR / "libmgvq_ops.so"
SOURCES = [Path(__file__).resolve().parent / "vq_gemm_cpu.cc"]

DEB_PACKAGE = "libonnxruntime-dev"
DEB_VERSION = "1.21.0+dfsg-1"
DEB_FILE = "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
DEB_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
DEB_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
REQUIRED_HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    logger.info("running %s", " ".join(cmd))
    return subprocess.run(cmd, check=True, **kwargs)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download_deb(workdir: Path) -> Path:
    """``apt-get download`` the pinned package from Debian trixie with a throwaway apt state."""
    for sub in ("lists/partial", "cache/archives/partial", "etc"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    signed = f" [signed-by={KEYRING}]" if Path(KEYRING).exists() else ""
    (workdir / "etc/sources.list").write_text(f"deb{signed} {DEB_MIRROR} trixie main\n")
    config = workdir / "etc/apt.conf"
    config.write_text(
        "\n".join(
            [
                f'Dir::Etc::SourceList "{workdir}/etc/sources.list";',
                'Dir::Etc::SourceParts "/nonexistent";',
                f'Dir::State::Lists "{workdir}/lists";',
                f'Dir::Cache "{workdir}/cache";',
                'Dir::State::status "/dev/null";',
                'Debug::NoLocking "true";',
                'APT::Sandbox::User "root";' if _is_root() else "",
            ]
        )
        + "\n"
    )
    env = {"APT_CONFIG": str(config), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    _run(["apt-get", "-q", "update"], env=env, stdout=subprocess.DEVNULL)
    _run(["apt-get", "-q", "download", f"{DEB_PACKAGE}={DEB_VERSION}"], env=env, cwd=workdir, stdout=subprocess.DEVNULL)
    return workdir / DEB_FILE


def _is_root() -> bool:
    return os.geteuid() == 0


def fetch_headers(deb: Path | None = None) -> Path:
    """Make sure ``build/ort-headers/`` holds ORT 1.21's headers; return that folder."""
    if all((HEADERS_DIR / name).exists() for name in REQUIRED_HEADERS):
        return HEADERS_DIR
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError("dpkg-deb is needed to unpack libonnxruntime-dev (Debian/Ubuntu build host)")
    with tempfile.TemporaryDirectory(prefix="mgvq-ort-deb-") as tmp:
        work = Path(tmp)
        if deb is None:
            if shutil.which("apt-get") is None:
                raise RuntimeError(
                    f"apt-get is not available: download {DEB_FILE} from {DEB_MIRROR}/pool/main/o/onnxruntime/ "
                    "and pass it with --deb"
                )
            deb = _download_deb(work)
        digest = _sha256(deb)
        if digest != DEB_SHA256:
            raise RuntimeError(f"{deb.name}: sha256 {digest} != expected {DEB_SHA256}")
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        source = work / "root/usr/include/onnxruntime"
        if HEADERS_DIR.exists():
            shutil.rmtree(HEADERS_DIR)
        HEADERS_DIR.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, HEADERS_DIR)
    (HEADERS_DIR / "SOURCE").write_text(f"{DEB_FILE} sha256 {DEB_SHA256}\n")
    logger.info("ORT headers in %s", HEADERS_DIR)
    return HEADERS_DIR


def build(output: Path = LIBRARY, *, force: bool = False, cxx: str = "g++") -> Path:
    """Compile the CPU kernels into ``output`` (skipped when it is newer than its sources)."""
    if not force and output.exists() and all(output.stat().st_mtime >= s.stat().st_mtime for s in SOURCES):
        return output
    headers = fetch_headers()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    cmd = [
        cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra",
        "-Wno-unused-parameter", f"-I{headers}", *map(str, SOURCES), "-o", str(tmp_out),
    ]
    _run(cmd)
    tmp_out.replace(output)  # atomic, so a concurrent loader never sees a half-written library
    logger.info("built %s", output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=LIBRARY)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--deb", type=Path, help=f"a local {DEB_FILE} instead of downloading it")
    parser.add_argument("--cxx", default="g++")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.deb is not None:
        fetch_headers(args.deb)
    print(build(args.output, force=args.force, cxx=args.cxx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
