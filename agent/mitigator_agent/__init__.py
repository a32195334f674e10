"""mitigator-agent: serves a server's TCP SYN-cookie secrets to MITIGATOR over SSH."""

import warnings
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mitigator-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def silence_dependency_warnings() -> None:
    """Hide the warnings our dependencies raise about each other, and only those.

    asyncssh names cryptography's DSA classes in type annotations when it is imported, and
    cryptography (51 and newer) deprecates DSA: five warnings, ten lines on stderr, before every
    command's own output, although the agent neither offers nor accepts DSA.  The filter takes
    that message only, only where asyncssh's own code raised it; every other warning, ours
    included, is shown as Python would show it.  Called here, when the package is first
    imported, because every entry point (the console script, ``python -m``, the tests) imports
    the package before the modules that import asyncssh.
    """
    try:
        from cryptography.utils import CryptographyDeprecationWarning
    except ImportError:  # pragma: no cover - cryptography always comes with asyncssh
        return
    warnings.filterwarnings("ignore", message=r"DSA is deprecated", category=CryptographyDeprecationWarning,
                            module=r"asyncssh(\.|$)")


silence_dependency_warnings()
