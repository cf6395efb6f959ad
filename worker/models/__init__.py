"""Model loading: where the weights come from, what the model is, its vision-language processor."""
