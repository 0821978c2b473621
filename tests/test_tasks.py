"""The worker's task helpers that need no Redis: the progress reporter's live curves."""

from __future__ import annotations

from app.run_folder import Progress
from app.tasks import CURVE_POINTS, ProgressReporter


class FakeJob:
    """What the reporter touches of an RQ job: its meta and save_meta()."""

    def __init__(self):
        self.meta = {}
        self.saves = 0

    def save_meta(self):
        self.saves += 1


def test_the_reporter_keeps_every_step_loss_and_each_epochs_dev_accuracy_in_the_meta():
    job = FakeJob()
    report = ProgressReporter(job)
    for step in range(1, 5):
        report(Progress(1, 1, step, 4, 1.0 / step, None, 10.0))
    report(Progress(1, 1, 4, 4, 0.25, 0.6, 10.0))  # the epoch's dev evaluation repeats the last step
    assert job.meta["curves"] == {"loss": [[1, 1.0], [2, 0.5], [3, 1 / 3], [4, 0.25]], "dev_accuracy": [[1, 0.6]]}
    assert job.saves <= 3  # throttled: the first step, the last step, the dev evaluation


def test_a_long_run_keeps_a_bounded_curve_with_its_first_and_last_steps():
    job = FakeJob()
    report = ProgressReporter(job)
    steps = 5 * CURVE_POINTS
    for step in range(1, steps + 1):
        report(Progress(1, 1, step, steps, 1.0, None, 10.0))
    loss = job.meta["curves"]["loss"]
    assert len(loss) <= CURVE_POINTS
    assert loss[0][0] == 1 and loss[-1][0] == steps
    assert [p[0] for p in loss] == sorted(p[0] for p in loss)
