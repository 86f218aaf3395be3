"""Code shared by relayd and relayc: wire protocol, multiplexer, config models, crypto helpers.

Nothing here imports ``relay_server`` or ``relay_client``; only ``aio`` imports asyncio.
"""

__version__ = "0.1.0"
