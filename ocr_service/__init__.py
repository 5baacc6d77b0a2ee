"""Service logic around the DeepSeek-OCR model: presets, inputs, weights, grounding, engine."""
