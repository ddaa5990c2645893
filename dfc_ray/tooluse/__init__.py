"""Tool-calling tasks (organism, BFCL, JSONL), prompt rendering and strict scoring."""
