"""Model+snapshot updates on the kiosk: verified download, child-process compile, self-test, switch,
probation and rollback, with one atomically replaced pointer file; and the AWS IoT Jobs client."""

from device.update.child import CompileFailed
from device.update.jobs import JobsBridge, JobsClient
from device.update.pairs import LoadedPair, UpdateSettings
from device.update.pointer import CONFIGURED, Pair, PairStore, Pointer, PointerError, configured_pair
from device.update.updater import Updater

__all__ = [
    "CONFIGURED",
    "CompileFailed",
    "JobsBridge",
    "JobsClient",
    "LoadedPair",
    "Pair",
    "PairStore",
    "Pointer",
    "PointerError",
    "UpdateSettings",
    "Updater",
    "configured_pair",
]
