"""The trained model outside training: safetensors + manifest, ONNX, per-layer latency and the fastest
exact form, and the CPU allocator setting inference runs under.

Import the modules themselves: ``trainer.export.latency``, ``malloc``, ``onnx_export``, ``torch_export``."""
