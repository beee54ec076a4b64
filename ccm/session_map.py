"""SessionMap: which live sessions each client is a party to, on both sides (the requesting
constellation, the executing device), with O(1) removal of one session from both."""

from __future__ import annotations

from ccm.domain import ClientType


class SessionMap:
    """Ordered sets (dict keys) per client and side, so adding or removing one session is O(1)
    and the order sessions started in is kept. No lock: the registry calls it under its own."""

    def __init__(self) -> None:
        self._by_side: dict[ClientType, dict[str, dict[str, None]]] = {t: {} for t in ClientType}
        self._parties: dict[str, list[tuple[ClientType, str]]] = {}

    def add(self, side: ClientType, client_id: str, session_id: str) -> None:
        self._by_side[side].setdefault(client_id, {})[session_id] = None
        parties = self._parties.setdefault(session_id, [])
        if (side, client_id) not in parties:  # the mapping is a set; keep parties in step
            parties.append((side, client_id))

    def of(self, side: ClientType, client_id: str) -> list[str]:
        return list(self._by_side[side].get(client_id, ()))

    def count(self, side: ClientType, client_id: str) -> int:
        return len(self._by_side[side].get(client_id, ()))

    def remove_client(self, side: ClientType, client_id: str) -> list[str]:
        """Forget every session of one client on one side; returns their ids."""
        removed = list(self._by_side[side].pop(client_id, ()))
        for session_id in removed:
            parties = self._parties.get(session_id)
            if parties is None:
                continue
            if (side, client_id) in parties:
                parties.remove((side, client_id))
            if not parties:
                del self._parties[session_id]
        return removed

    def remove_session(self, session_id: str) -> bool:
        """Drop one session from both sides. Idempotent."""
        parties = self._parties.pop(session_id, None)
        if not parties:
            return False
        for side, client_id in parties:
            sessions = self._by_side[side].get(client_id)
            if sessions is not None:
                sessions.pop(session_id, None)
                if not sessions:
                    del self._by_side[side][client_id]
        return True

    def __len__(self) -> int:
        return len(self._parties)
