"""The embedded model organism: a tiny real Qwen2 pair (A = RL-tuned for tool use, B = base)."""
