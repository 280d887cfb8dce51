# Metadata lives in setup.cfg.  This file adds what a static file cannot say:
#
# * the packages, because the load generator lives in bench/ (setup.cfg's find: cannot
#   search two roots);
# * the dependencies, because one is computed: the client library, the distribution
#   `trtserve-client` in clients/ (clients/pyproject.toml), which alone owns the import
#   package `trtserve_client` (the wire format and the error tree).  From a checkout,
#   `pip install -e .` installs it from clients/ through a direct `file:` reference, which
#   pip accepts only as an absolute URL; an sdist carries no clients/ and names the
#   released distribution instead (docs/packaging.md).
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
CLIENTS = HERE / "clients"


def client_requirement() -> str:
    if (CLIENTS / "pyproject.toml").is_file():
        return f"trtserve-client @ {CLIENTS.as_uri()}"
    # The client must speak the server's protocol: the two are released with one version.
    version = re.search(r'^__version__ = "(.+)"$', (HERE / "trtserve/__init__.py").read_text(), re.M)
    return f"trtserve-client=={version[1]}"


server = find_packages(include=["trtserve", "trtserve.*"])
bench = find_packages(where="bench", include=["trtserve_bench", "trtserve_bench.*"])
setup(
    packages=server + bench,
    package_dir={name: "bench/" + name.replace(".", "/") for name in bench},
    install_requires=[
        client_requirement(),
        "numpy>=1.24",
        "msgpack>=1.0.5",
        "onnxruntime>=1.17",
        "opencv-python-headless>=4.8",
        'uvloop>=0.19; sys_platform != "win32"',
        "prometheus-client>=0.19",
    ],
)
