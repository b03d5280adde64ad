"""Release candidates: a desired release downloaded and verified (signatures, pairing) into the generation
store, then handed to the switcher (device.generations); and the AWS IoT Jobs client."""

from device.update.jobs import JobsBridge, JobsClient
from device.update.updater import Updater

__all__ = ["JobsBridge", "JobsClient", "Updater"]
