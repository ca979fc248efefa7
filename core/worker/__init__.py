"""A worker process: one model stack serving one live session at a time, plus one-shot requests."""
