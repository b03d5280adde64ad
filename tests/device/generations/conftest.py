"""The generation tests share the fleet's session releases."""

from tests.fleet.conftest import releases

__all__ = ["releases"]
