#!/usr/bin/env bash
# Build the staff dashboard into build/dashboard/: the static page plus MQTT.js's browser bundle from
# the npm registry (package.json / package-lock.json at the repo root). No CDN at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/dashboard}
if [ ! -f node_modules/mqtt/dist/mqtt.min.js ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; else npm install --no-audit --no-fund --loglevel=error; fi
fi
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
cp cloud/dashboard/static/* "$OUT.tmp/"
cp node_modules/mqtt/dist/mqtt.min.js "$OUT.tmp/mqtt.min.js"
cp node_modules/mqtt/LICENSE.md "$OUT.tmp/mqtt.LICENSE.md" 2>/dev/null || true
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "dashboard built in $OUT (mqtt $(node -p 'require("./node_modules/mqtt/package.json").version'))"
