"""The server: FastAPI app factory, AIP WebSocket endpoint, HTTP API."""
