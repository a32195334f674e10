"""Kernel tests: on the host they boot guests; the guest/ suite runs inside them."""

import os

IN_GUEST = os.environ.get("TCPSECRETS_IN_GUEST") == "1"

# guest/ needs a booted test kernel with the module: the host collects it
# only through test_guest_kernels.py, which boots one and runs it there.
collect_ignore = [] if IN_GUEST else ["guest"]
