"""What a registered model version carries besides its files: the job, its params and its accuracies."""

from __future__ import annotations

import json


def version_tags(job_id: str, params: dict, metrics: dict) -> dict[str, str]:
    """The tags a registered version carries: job id, params, dev accuracy (of the kept epoch), val accuracy."""
    dev = metrics["dev_accuracy_per_epoch"][metrics["kept_epoch"] - 1]
    return {
        "job_id": job_id,
        "params": json.dumps(params, sort_keys=True),
        "dev_accuracy": str(dev),
        "val_accuracy": str(metrics["accuracy"]),
    }
