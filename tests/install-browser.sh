#!/bin/sh
# The audit report's browser test drives Debian's Chromium (no browser is downloaded at test time).
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
