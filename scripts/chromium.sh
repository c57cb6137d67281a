#!/usr/bin/env bash
# Installs what the dashboard's browser test drives, on Debian or Ubuntu: Debian's
# `chromium` and `chromium-driver` packages (/usr/bin/chromium, /usr/bin/chromedriver),
# with apt-get (through sudo unless run as root). Nothing is downloaded from anywhere
# but the distribution's package archive.
#
# Prints, as `export` lines on standard output, where they are
# (`eval "$(bash scripts/chromium.sh)"` sets SAGAFLOW_CHROMIUM and SAGAFLOW_CHROMEDRIVER,
# which the browser test reads). Running it again is fine: installed packages are not
# installed again.

set -euo pipefail

say() { printf 'chromium.sh: %s\n' "$*" >&2; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    say "already installed: $(chromium --version 2>/dev/null | head -n1)"
else
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        SUDO="sudo"
    fi
    say "installing chromium and chromium-driver with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # A stale package list can name versions the archive no longer has.
    $SUDO apt-get update -qq >&2 || say "apt-get update failed; trying with the lists as they are"
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi

CHROMIUM="$(command -v chromium)"
DRIVER="$(command -v chromedriver)"
say "ready: $("$CHROMIUM" --version 2>/dev/null | head -n1), $("$DRIVER" --version 2>/dev/null | head -n1)"
printf 'export SAGAFLOW_CHROMIUM=%q\n' "$CHROMIUM"
printf 'export SAGAFLOW_CHROMEDRIVER=%q\n' "$DRIVER"
