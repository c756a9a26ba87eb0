#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
# Idempotent: system packages and PostgreSQL are only touched when missing or stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: FFmpeg and ffprobe, GStreamer's player (playbin3 with
# hlsdemux2) and RTSP server (the test camera), Chromium for hls.js, and mpv.
packages=(ffmpeg gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
          gstreamer1.0-plugins-bad gstreamer1.0-libav gir1.2-gst-rtsp-server-1.0 python3-gi
          chromium fonts-dejavu-core mpv)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# PostgreSQL at 127.0.0.1:5432 for the queue suite's second backend.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

# hls.js, pinned in tests/web/package-lock.json.
(cd tests/web && npm ci --no-audit --no-fund --silent)

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,postgres]'
exec .venv/bin/python -m pytest "$@"
