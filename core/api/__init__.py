"""The public APIs the gateway serves beside its own protocol: transcription jobs, the OpenAI-compatible
endpoints and the OpenAI Realtime events (whose mapping the workers share)."""
