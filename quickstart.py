#!/usr/bin/env python3
"""Sets up .venv on first use (or when pyproject.toml changes), then runs a command in it.

    python3 quickstart.py train [hydra overrides...]   # the default CPU run (see README)
    python3 quickstart.py test [pytest args...]        # the test suite (runs pytest)
    python3 quickstart.py setup                        # only create / refresh .venv

On a machine without an NVIDIA GPU torch is installed first as the CPU build (a wheel pip already finds
locally, else the PyTorch CPU index), so the project's requirements never pull a multi-GB CUDA build.
Needs only the Python standard library.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
MARKER = VENV / ".areal-async-installed"
CPU_TORCH = "torch==2.13.0"
CPU_TORCH_INDEX = os.environ.get("AREAL_TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu")


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "quickstart.py"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def has_nvidia_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pip(*args: str) -> int:
    return subprocess.call([str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", *args])


def setup() -> None:
    fingerprint = install_fingerprint()
    if MARKER.is_file() and MARKER.read_text() == fingerprint:
        return
    started = time.time()
    if not venv_python().exists():
        print(f"[quickstart] creating {VENV}", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    if not has_nvidia_gpu():
        print(f"[quickstart] no NVIDIA GPU: installing the CPU build of torch ({CPU_TORCH})", flush=True)
        # torch alone from a local wheel or the CPU index; its own dependencies come from PyPI below
        local = pip("-q", "--no-deps", "--no-index", CPU_TORCH) == 0
        if not local and pip("-q", "--no-deps", "--index-url", CPU_TORCH_INDEX, CPU_TORCH) != 0:
            sys.exit(f"[quickstart] could not install {CPU_TORCH} (CPU build); set AREAL_TORCH_CPU_INDEX")
    print("[quickstart] installing areal-async with its dev extra", flush=True)
    if pip("-q", "-e", f"{ROOT}[dev]") != 0:
        sys.exit("[quickstart] pip install failed (see above)")
    MARKER.write_text(fingerprint)
    print(f"[quickstart] environment ready in {time.time() - started:.0f} s", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("train", "test", "setup"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    setup()
    if command == "setup":
        return 0
    if command == "test":
        return subprocess.call([str(venv_python()), "-m", "pytest", *rest], cwd=ROOT)
    return subprocess.call([str(venv_python()), "-m", "areal_async.run.cli", "train", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
