"""The embedding model's life: export, preprocessing, quantization, bundle + manifest, runtime."""

import sys

# `import openvino` (its model-conversion tools) and NNCF start usage telemetry to Google Analytics, a
# thread and a subprocess per event, unless the user opted out on that machine. A kiosk sends nothing but
# its own events, and neither does a catalog build: with the module unimportable both use their no-op
# stubs. Every use of OpenVINO in the product goes through this package, so this runs first.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
