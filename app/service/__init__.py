"""The job service: training jobs and sweeps on RQ, admission, the model registry and serving fine-tuned models."""
