"""System tests: the installer and the Debian packages on a real Debian 12 system in qemu."""
