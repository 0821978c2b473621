"""The training engine: BoolQ data, encoding, the model, fine-tuning, evaluation, the run folder. No web, no Redis."""
