"""Benchmarks (``python -m runtime.bench``): exports side by side against transformers (``exports``), random-weight
models at real shapes (``synthetic``), onnxruntime-genai as the CPU peer (``peer``, ``python -m
runtime.bench.peer``), and the measurement helpers they share (``measure``). Tools only: nothing in the runtime's
core imports them."""
