"""Fetch the pinned SGLang release wheel from PyPI and unpack it under .cache/sglang-ref/<version>/ (idempotent).

The tests import SGLang's own request schema, tensor serializer and CLI parser from this copy, so the other
end of the rollout tests is SGLang's code, not an imitation. Nothing from it is installed or committed: the
wheel is only unpacked, and the tests load single modules by path without running sglang/__init__.py.

    python tools/fetch_sglang_ref.py            # download (pip download --no-deps) + unpack if missing
    python tools/fetch_sglang_ref.py --print    # print the unpacked directory
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SGLANG_REF_VERSION = "0.5.23"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "sglang-ref")


def ref_dir(version: str = SGLANG_REF_VERSION) -> str:
    return os.path.join(ROOT, version)


def fetch(version: str = SGLANG_REF_VERSION, python: str = sys.executable) -> str:
    """Unpacked directory of sglang==version (downloaded from PyPI the first time)."""
    out = ref_dir(version)
    marker = os.path.join(out, "sglang", "api", "v1", "api_types.py")
    if os.path.isfile(marker):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[setup] downloading sglang=={version} (wheel only, not installed) for the SGLang reference tests",
              flush=True)
        cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", f"sglang=={version}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, f"sglang-{version}-*.whl"))
        if r.returncode != 0 or not wheels:
            raise SystemExit(f"fetch_sglang_ref: `{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
        part = out + ".part"
        shutil.rmtree(part, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as z:
            names = [n for n in z.namelist() if n.startswith("sglang/") and n.endswith(".py")]
            z.extractall(part, members=names)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(part, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default=SGLANG_REF_VERSION)
    p.add_argument("--print", action="store_true", help="print the unpacked directory")
    a = p.parse_args(argv)
    path = fetch(a.version)
    if a.print:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
