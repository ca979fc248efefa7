"""CosyVoice2-0.5B text to speech: our implementation of the speech-token LM, the flow-matching mel
decoder and the HiFT vocoder, loading the official model folder (see loader.py)."""

from core.models.cosyvoice.errors import CosyVoiceError
from core.models.cosyvoice.tts import DEFAULT_VOICE, CosyVoice2TTS

__all__ = ["DEFAULT_VOICE", "CosyVoice2TTS", "CosyVoiceError"]
