# Metadata lives in setup.cfg.  Packages are listed here because two of them live outside
# trtserve/: the client library in clients/ (installable on its own with only msgpack +
# numpy, see clients/pyproject.toml) and the load generator in bench/; setup.cfg's find:
# cannot search several roots.
from setuptools import find_packages, setup

server = find_packages(include=["trtserve", "trtserve.*"])
client = find_packages(where="clients", include=["trtserve_client", "trtserve_client.*"])
bench = find_packages(where="bench", include=["trtserve_bench", "trtserve_bench.*"])
setup(
    packages=server + client + bench,
    package_dir={
        **{name: "clients/" + name.replace(".", "/") for name in client},
        **{name: "bench/" + name.replace(".", "/") for name in bench},
    },
)
