"""Batch transcription ("distillation"): a manifest of audio and video files -> resumable JSONL transcripts.

``manifest`` reads what to do, ``pipeline`` decodes, segments and transcribes with batches across files,
``writer`` appends crash-safe rows, ``shard``/``merge`` split a run across processes and join the outputs,
``cli`` is ``worker.py --distill``, and ``ray_runner`` runs the same stages on a Ray cluster.
"""
