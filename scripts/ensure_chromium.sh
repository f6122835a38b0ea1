#!/usr/bin/env bash
# Install Debian's chromium for the report's browser test, only when it is missing.
# Playwright drives this system browser (it never downloads one: see tests/_browser.py).
# The version is printed from the real binary: Debian's /usr/bin/chromium wrapper prints
# "[: <bytes>: unexpected operator" where /dev/shm is mounted twice (its dev-shm check reads
# two numbers from findmnt); harmless, and the tests launch the real binary to stay quiet.
set -euo pipefail
if [ ! -x /usr/bin/chromium ] && [ ! -x /usr/lib/chromium/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends chromium
fi
if [ -x /usr/lib/chromium/chromium ]; then
  /usr/lib/chromium/chromium --version
else
  /usr/bin/chromium --version 2>/dev/null
fi
