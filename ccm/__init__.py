"""ccm: the Client Connection Manager for AIP devices and constellations.

Importing ccm has no side effects: nothing reads the environment or opens a database.
"""

from ccm.registry import ClientConnectionManager, ClientInfo, ClientType
from ccm.version import VERSION

__all__ = ["ClientConnectionManager", "ClientInfo", "ClientType", "__version__"]
__version__ = VERSION
