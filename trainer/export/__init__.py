"""The trained model outside training: safetensors + manifest, ONNX, per-layer latency and the fastest
exact form, conv + activation fusion for CPU inference, the latency tables a latency budget plans from, and the
CPU allocator setting inference runs under.

Import the modules themselves: ``trainer.export.latency``, ``latency_table``, ``fuse``, ``malloc``,
``onnx_export``, ``torch_export``."""
