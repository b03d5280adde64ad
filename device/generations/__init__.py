"""What the kiosk serves: the generation store (one pointer: active + last good), the switcher (the one
way a candidate becomes what serves), and the serving reference the pipeline reads per held item."""

from device.generations.canary import UpdateFailed
from device.generations.child import CompileFailed
from device.generations.loaded import LoadedGeneration, RetiredModels, close_embedder
from device.generations.store import (
    CONFIGURED,
    Generation,
    GenerationStore,
    Pointer,
    PointerError,
    generation_zero,
)
from device.generations.switcher import Candidate, Switcher, switch_snapshot

__all__ = [
    "CONFIGURED",
    "Candidate",
    "CompileFailed",
    "Generation",
    "GenerationStore",
    "LoadedGeneration",
    "Pointer",
    "PointerError",
    "RetiredModels",
    "Switcher",
    "UpdateFailed",
    "close_embedder",
    "generation_zero",
    "switch_snapshot",
]
