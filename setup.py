# Metadata lives in setup.cfg.  Packages are listed here because the client library lives
# in clients/ (installable on its own with only msgpack + numpy, see clients/pyproject.toml)
# and setup.cfg's find: cannot search two roots.
from setuptools import find_packages, setup

server = find_packages(include=["trtserve", "trtserve.*"])
client = find_packages(where="clients", include=["trtserve_client", "trtserve_client.*"])
setup(
    packages=server + client,
    package_dir={name: "clients/" + name.replace(".", "/") for name in client},
)
