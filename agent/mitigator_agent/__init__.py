"""mitigator-agent: serves a server's TCP SYN-cookie secrets to MITIGATOR over SSH."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mitigator-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
