"""What every frontend is: the part of relayd through which visitors reach tunnels of one kind.

The registry dispatches a tunnel's kind once, to its frontend, and calls only this interface:
``start`` opens what the frontend shares between tunnels (a vhost port); ``claim`` makes one
tunnel reachable (taking its port or domains through the registry's claim tables, which decide
ownership) and returns where visitors reach it; ``release`` undoes that.  A new tunnel kind (UDP,
secret tunnels, HTTPS termination) is one new module implementing it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from shared.tunnel import TunnelKind

if TYPE_CHECKING:
    from relay_server.control import ClientSession
    from relay_server.tunnels import PublicTunnel
    from shared.aio import MuxConnection, StreamHandler


class Frontend(abc.ABC):
    kind: TunnelKind

    async def start(self) -> None:  # noqa: B027 - most frontends share nothing between tunnels
        """Open what this frontend shares between its tunnels (nothing by default)."""

    @abc.abstractmethod
    async def claim(self, tunnel: PublicTunnel) -> str:
        """Make ``tunnel`` reachable; set ``tunnel.port`` and return where visitors reach it.
        Raise ``shared.errors.TunnelRefused`` with the reason if it cannot be."""

    @abc.abstractmethod
    def release(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        """Make ``tunnel`` unreachable and reset its visitors.  ``client_gone``: its client went
        away (what it held stays reserved for it), rather than the tunnel being removed."""

    def update(self, tunnel: PublicTunnel) -> str:
        """``tunnel.spec`` changed in place (same kind and place: port, domains, locations, group):
        apply what this frontend took from it when claiming; return where visitors reach it."""
        return tunnel.public

    def stop_accepting(self, tunnel: PublicTunnel) -> None:  # noqa: B027 - shared listeners close in stop()
        """Turn new visitors of ``tunnel`` away; those connected carry on (graceful shutdown)."""

    async def stop(self) -> None:  # noqa: B027
        """Close what ``start`` opened."""

    def peer_stream(self, session: ClientSession, mux: MuxConnection, stream_id: int) -> StreamHandler | None:
        """A stream a logged-in relayc opened: its handler, if this frontend serves such streams
        (secret tunnels' visits); None (the default) leaves it to the others, then it is reset."""
        return None

    @property
    def bound_port(self) -> int:
        """The shared port this frontend listens on (0: none, or one per tunnel)."""
        return 0
