"""Speech: speech-to-text (Whisper: faster-whisper or openai-whisper) and text-to-speech
(Piper voices on onnxruntime). `aimesh serve stt` / `aimesh serve tts` load the
`stt` / `tts` modules here; engines hold no gRPC, servicers are thin."""
