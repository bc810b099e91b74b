"""Reference implementations: plain, readable PyTorch. Each one is the spec of its op, every other
backend is tested against it, and it runs on any device."""
