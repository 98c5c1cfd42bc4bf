"""Training, evaluation and explanations for the attention classifier (the model's life before serving)."""
