"""Build the mgvq custom-op library for ONNX Runtime (CPU): ``python custom_ops/build.py``.

ORT's C/C++ headers are not in its Python wheels; they are taken from Debian's
``libonnxruntime-dev`` (trixie, 1.21), downloaded with a private apt configuration into
``build/ort-headers/`` (nothing is installed; the .deb's sha256 is checked). The library uses only the
OrtApi pointer handed to ``RegisterCustomOps``, so it does not link against libonnxruntime and a build
against the 1.21 headers loads in newer ORT releases.

``--cuda`` also builds ``libmgvq_ops_cuda.so`` with nvcc (see :func:`build_cuda`): the CUDA kernels, their
ORT glue and the CPU kernels in one custom-op domain, the CUDA runtime linked in statically.
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

__all__ = ["ROOT", "BUILD_DIR", "HEADERS_DIR", "LIBRARY", "CUDA_LIBRARY", "missing_tools", "fetch_headers", "build",
           "find_nvcc", "build_cuda", "main"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build"
HEADERS_DIR = BUILD_DIR / "ort-headers"
LIBRARY = BUILD_DIR / "libmgvq_ops.so"
SOURCES = [Path(__file__).resolve().parent / "vq_gemm_cpu.cc"]
# What the CPU library is built from: its sources and the header it shares with the CUDA glue.
CPU_INPUTS = [*SOURCES, Path(__file__).resolve().parent / "vq_gemm_op.h"]
CUDA_LIBRARY = BUILD_DIR / "libmgvq_ops_cuda.so"
_CUSTOM_OPS = Path(__file__).resolve().parent
CUDA_KERNELS = _CUSTOM_OPS / "vq_gemm_cuda.cu"
CUDA_GLUE = _CUSTOM_OPS / "vq_gemm_cuda_ops.cc"
CUDA_SOURCES = [CUDA_KERNELS, CUDA_GLUE, _CUSTOM_OPS / "vq_gemm_cuda.h", *CPU_INPUTS]
# SASS for Ampere (runs on sm_86/sm_89 too) and Hopper, plus PTX that newer GPUs compile at load.
CUDA_GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)

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


TOOL_HINTS = {
    "apt-get": f"downloads ORT's headers ({DEB_PACKAGE}); without it, fetch {DEB_FILE} from "
               f"{DEB_MIRROR}/pool/main/o/onnxruntime/ and run python custom_ops/build.py --deb FILE",
    "dpkg-deb": "unpacks the headers' .deb (Debian/Ubuntu package dpkg)",
}


def _headers_present() -> bool:
    return all((HEADERS_DIR / name).exists() for name in REQUIRED_HEADERS)


def missing_tools(cxx: str = "g++") -> list[str]:
    """The build tools not on PATH: the C++ compiler, and apt-get/dpkg-deb while the headers are not fetched."""
    needed = [cxx] + ([] if _headers_present() else ["apt-get", "dpkg-deb"])
    return [tool for tool in needed if shutil.which(tool) is None]


def _check_tools(cxx: str) -> None:
    missing = missing_tools(cxx)
    if missing:
        hints = {cxx: "a C++17 compiler; on Debian/Ubuntu: apt-get install g++", **TOOL_HINTS}
        raise RuntimeError(
            "build tools missing on PATH: "
            + "; ".join(f"{tool} ({hints.get(tool, 'needed by the build')})" for tool in missing)
        )


def fetch_headers(deb: Path | None = None) -> Path:
    """Make sure ``build/ort-headers/`` holds ORT 1.21's headers; return that folder."""
    if _headers_present():
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


def build(output: Path = LIBRARY, *, force: bool = False, cxx: str = "g++", sources: list[Path] | None = None) -> Path:
    """Compile the CPU kernels into ``output`` (skipped when it is newer than its sources). ``sources``: other
    copies of them (an earlier commit's, for a side-by-side timing), always compiled."""
    if sources is None and not force and output.exists() and \
            all(output.stat().st_mtime >= s.stat().st_mtime for s in CPU_INPUTS):
        return output
    _check_tools(cxx)
    headers = fetch_headers()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    cmd = [
        cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra",
        "-Wno-unused-parameter", f"-I{headers}", *map(str, SOURCES if sources is None else sources), "-o", str(tmp_out),
    ]
    _run(cmd)
    tmp_out.replace(output)  # atomic, so a concurrent loader never sees a half-written library
    logger.info("built %s", output)
    return output


def find_nvcc(nvcc: str | None = None) -> str | None:
    """The nvcc to use: ``nvcc`` if given, else $CUDACXX, nvcc on PATH or /usr/local/cuda/bin/nvcc."""
    candidates = [nvcc] if nvcc else [os.environ.get("CUDACXX"), "nvcc", "/usr/local/cuda/bin/nvcc"]
    for candidate in filter(None, candidates):
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _cuda_home(nvcc: str) -> Path:
    """CUDA's root for an nvcc, which may be a wrapper script: nvcc --dryrun names it (TOP=)."""
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return Path(nvcc).resolve().parent.parent


def _cuda_dirs(nvcc: str) -> tuple[Path, Path]:
    """CUDA's include and library folders for an nvcc."""
    home = _cuda_home(nvcc)
    include = home / "include"
    lib = next((d for d in (home / "lib64", home / "lib", home / "targets/x86_64-linux/lib")
                if (d / "libcudart_static.a").exists()), home / "lib64")
    return include, lib


def build_cuda(output: Path = CUDA_LIBRARY, *, force: bool = False, nvcc: str | None = None,
               cxx: str = "g++") -> Path | None:
    """Compile the CUDA kernels, their ORT glue and the CPU kernels into ``output``.

    Returns None (and logs why) when no nvcc is found. The CUDA runtime is linked statically, so the
    library needs only the NVIDIA driver (one recent enough for the nvcc's CUDA version) at run time.
    """
    compiler = find_nvcc(nvcc)
    if compiler is None:
        logger.warning("nvcc not found (pass --nvcc, set CUDACXX or put it on PATH): the CUDA library is not built")
        return None
    if not force and output.exists() and all(output.stat().st_mtime >= s.stat().st_mtime for s in CUDA_SOURCES):
        return output
    _check_tools(cxx)
    headers = fetch_headers()
    include, lib = _cuda_dirs(compiler)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    with tempfile.TemporaryDirectory(prefix="mgvq-cuda-", dir=output.parent) as tmp:
        objects = [Path(tmp) / name for name in ("kernels.o", "glue.o", "cpu.o")]
        _run([
            compiler, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            f"--threads={min(3, os.cpu_count() or 1)}", *CUDA_GENCODE, "-c", str(CUDA_KERNELS), "-o", str(objects[0]),
        ])
        common = [cxx, "-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter",
                  f"-I{headers}"]
        _run([*common, f"-I{include}", "-c", str(CUDA_GLUE), "-o", str(objects[1])])
        # The CPU kernels join the CUDA library's domain (see vq_gemm_cuda_ops.cc), so their entry point
        # is renamed.
        _run([*common, "-DRegisterCustomOps=mgvq_cpu_register_custom_ops", "-c", str(SOURCES[0]), "-o",
              str(objects[2])])
        _run([
            cxx, "-shared", *map(str, objects), "-o", str(tmp_out), f"-L{lib}", "-l:libcudart_static.a",
            "-ldl", "-lpthread", "-lrt", "-Wl,--exclude-libs,ALL", "-Wl,--no-undefined",
        ])
    tmp_out.replace(output)
    logger.info("built %s", output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=LIBRARY)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--deb", type=Path, help=f"a local {DEB_FILE} instead of downloading it")
    parser.add_argument("--cxx", default="g++")
    parser.add_argument("--cuda", action="store_true", help=f"also build the CUDA library ({CUDA_LIBRARY.name})")
    parser.add_argument("--nvcc", help="the nvcc to use (default: $CUDACXX, PATH, /usr/local/cuda/bin/nvcc)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.deb is not None:
        fetch_headers(args.deb)
    print(build(args.output, force=args.force, cxx=args.cxx))
    if args.cuda:
        cuda = build_cuda(force=args.force, nvcc=args.nvcc, cxx=args.cxx)
        if cuda is None:
            return 1
        print(cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
