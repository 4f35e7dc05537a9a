"""The HTTP face: the same runs as the gRPC face, over JSON and Server-Sent Events (docs/http.md)."""
