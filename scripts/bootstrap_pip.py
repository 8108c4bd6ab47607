"""Install pip into the running interpreter's venv, using only the standard library.

For Pythons without ensurepip (Debian's python3 without python3-venv). Fetches
the newest pip wheel from PyPI's JSON API and runs pip from the wheel to
install itself (a wheel is importable, so ``python pip.whl/pip`` works).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

PYPI_JSON = "https://pypi.org/pypi/pip/json"


def _context() -> ssl.SSLContext:
    bundle = os.environ.get("SSL_CERT_FILE") or os.environ.get("PIP_CERT")
    return ssl.create_default_context(cafile=bundle) if bundle else ssl.create_default_context()


def main() -> int:
    with urllib.request.urlopen(PYPI_JSON, context=_context(), timeout=60) as response:
        release = json.load(response)
    wheel = next(f for f in release["urls"] if f["filename"].endswith("-py3-none-any.whl"))
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, wheel["filename"])
        url = urllib.parse.urljoin(PYPI_JSON, wheel["url"])  # mirrors may answer with relative links
        with urllib.request.urlopen(url, context=_context(), timeout=300) as response, open(path, "wb") as out:
            out.write(response.read())
        return subprocess.call([sys.executable, f"{path}/pip", "install", "--quiet", "--disable-pip-version-check", path])


if __name__ == "__main__":
    sys.exit(main())
