"""The transport: everything that knows gRPC, protobuf or the generated code. The core below imports none of it
(tests/test_layers.py checks)."""
