#!/usr/bin/env bash
# Install Debian's chromium for the report's browser test, only when it is missing.
# Playwright drives this system browser (it never downloads one: see branchlens.report.browser).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium
/usr/bin/chromium --version
