import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from app.engine.encoding import Encoded, collate, length_grouped_batches
from app.engine.evaluation import predict_probabilities, predicted_labels
from app.engine.model_names import ModelNotAvailable, resolve_model
from app.engine.modeling import DeviceNotAvailable, compute_last_layer_for_first_token_only, resolve_device
from app.engine.training import fine_tune, train_and_evaluate
from app.params import TrainParams
from app.service.predict import Predictor
from app.tracking import NullTracker
from tests.helpers import RESUMABLE, random_split, seeded_tiny_bert, tiny_bert

ROOT = Path(__file__).resolve().parents[2]


def test_loss_decreases(tiny_run, tiny_params):
    result, _ = tiny_run
    losses = result.metrics["loss_curve"]
    steps_per_epoch = len(losses) // tiny_params["epochs"]
    first, last = losses[:steps_per_epoch], losses[-steps_per_epoch:]
    assert statistics.mean(last) < statistics.mean(first) - 0.05


def test_run_folder_holds_every_output(tiny_run, tiny_params):
    result, _ = tiny_run
    run_dir = Path(result.run_dir)
    assert json.loads((run_dir / "params.json").read_text()) == TrainParams(**tiny_params).model_dump()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1", "confusion_matrix", "dev_accuracy_per_epoch", "loss_curve"):
        assert key in metrics
    assert len(metrics["dev_accuracy_per_epoch"]) == tiny_params["epochs"]
    assert metrics["train_examples_per_s"] > 0 and metrics["timings_s"]["train"] > 0
    assert metrics["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "model" / "tokenizer.json").is_file()


def test_accuracy_equals_sklearn_on_written_predictions(tiny_run, tiny_params):
    result, _ = tiny_run
    rows = [json.loads(line) for line in (Path(result.run_dir) / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == result.n_eval == tiny_params["eval_limit"]
    assert [r["prediction"] for r in rows] == result.predictions
    assert [r["idx"] for r in rows] == list(range(tiny_params["eval_limit"]))
    assert all(r["prediction"] == int(r["probability"] >= 0.5) for r in rows)
    assert result.accuracy == accuracy_score([r["label"] for r in rows], [r["prediction"] for r in rows])
    cm = result.metrics["confusion_matrix"]
    assert sum(map(sum, cm)) == result.n_eval and cm[0][0] + cm[1][1] == round(result.accuracy * result.n_eval)


def test_progress_reports_every_step_and_each_epochs_dev_accuracy(tiny_run, tiny_params):
    result, progress = tiny_run
    steps = [p.step for p in progress if p.dev_accuracy is None]
    assert steps == list(range(1, progress[-1].total_steps + 1))
    dev = [p.dev_accuracy for p in progress if p.dev_accuracy is not None]
    assert dev == result.metrics["dev_accuracy_per_epoch"]
    assert all(p.examples_per_s > 0 and p.epochs == tiny_params["epochs"] for p in progress)


def test_save_and_predict_round_trip(tiny_run):
    result, _ = tiny_run
    predictor = Predictor(result.run_dir)
    rows = [json.loads(line) for line in (Path(result.run_dir) / "predictions.jsonl").read_text().splitlines()]
    from app.config import SAMPLE_DATA_DIR
    from app.engine.boolq import load_boolq

    val = load_boolq(SAMPLE_DATA_DIR).val[:3]
    answers = predictor.predict([(e.text, e.text_pair) for e in val])
    for answer, row in zip(answers, rows, strict=False):
        assert answer.best == row["prediction"] and answer.label_names == ("no", "yes")
        assert answer.to_yes_no()["probability"] == pytest.approx(row["probability"], abs=1e-4)


@pytest.mark.slow
def test_keep_best_epoch_ends_with_the_weights_of_the_best_dev_epoch(tmp_path, tiny_params):
    from app.engine.boolq import load_boolq
    from app.engine.data import split_train_dev
    from app.engine.encoding import encode
    from app.engine.evaluation import predict_probabilities, predicted_labels
    from app.engine.modeling import load_tokenizer

    # This rate and seed give dev accuracies 0.583, 0.417, 0.417: the last epoch is not the best one.
    params = TrainParams(
        **tiny_params | {"epochs": 3, "dev_size": 0.25, "keep_best_epoch": True, "lr": 3e-2, "seed": 2}
    )
    result = train_and_evaluate(params, _sample(), tmp_path)
    per_epoch = result.metrics["dev_accuracy_per_epoch"]
    kept = result.metrics["kept_epoch"]
    assert kept == per_epoch.index(max(per_epoch)) + 1 and result.dev_accuracy == max(per_epoch) > per_epoch[-1]
    # The saved model is the kept epoch's: it scores that epoch's dev accuracy again.
    _, dev_rows = split_train_dev(load_boolq(_sample()).train[: params.train_limit], params.dev_size, params.seed)
    predictor = Predictor(result.run_dir)
    dev = encode(load_tokenizer(params.model), dev_rows, params.max_length)
    probabilities = predict_probabilities(predictor.model, predictor.tokenizer.pad_token_id, dev)
    assert accuracy_score(dev.labels, predicted_labels(probabilities)) == max(per_epoch)


@pytest.mark.slow
def test_early_stopping_ends_training_and_keeps_the_best_epoch(tmp_path, tiny_model_dir):
    # At this rate the tiny model learns only the majority class: dev accuracy stalls at once (0.6, 0.6, ... over
    # 4 epochs), so patience 1 ends the run after epoch 2.
    params = TrainParams(
        **{**RESUMABLE, "model": str(tiny_model_dir), "lr": 5e-3, "epochs": 4, "early_stopping_patience": 1}
    )
    result = train_and_evaluate(params, _sample(), tmp_path)
    m = result.metrics
    assert m["early_stopped"] is True and m["stopped_epoch"] == 2 == len(m["dev_accuracy_per_epoch"])
    assert m["kept_epoch"] == 1 and result.dev_accuracy == m["dev_accuracy_per_epoch"][0]
    assert len(m["loss_curve"]) == 2 * 4  # two epochs of 4 steps, not four
    assert json.loads((Path(result.run_dir) / "metrics.json").read_text())["stopped_epoch"] == 2


def test_early_stopping_keeps_the_best_epoch_not_the_first_and_stops_patience_epochs_after_it():
    # Dev is the train split itself: a tiny BERT memorises it, so dev accuracy climbs from chance and then stalls,
    # and the kept epoch is not the first one by a tie.
    data = random_split(32, seed=3)
    params = TrainParams(lr=3e-3, epochs=10, batch_size=8, warmup_ratio=0.0, seed=0, early_stopping_patience=2)
    model = seeded_tiny_bert()
    history = fine_tune(model, 0, data, data, params, None, NullTracker())
    per_epoch = history.dev_accuracy
    assert history.kept_epoch == per_epoch.index(max(per_epoch)) + 1 > 1 and per_epoch[0] < max(per_epoch)
    assert history.early_stopped and history.stopped_epoch == history.kept_epoch + 2 == len(per_epoch)
    assert len(history.loss) == history.stopped_epoch * 4  # 4 steps an epoch, none after the stop
    # The model ends with the kept epoch's weights: it scores that epoch's dev accuracy again.
    assert accuracy_score(data.labels, predicted_labels(predict_probabilities(model, 0, data))) == max(per_epoch)


class Crash(Exception):
    """Stands for the process dying at a given step."""


@pytest.mark.slow
def test_a_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path, tiny_model_dir):
    params = TrainParams(**RESUMABLE | {"model": str(tiny_model_dir), "lr": 1e-2})  # weights that move a lot
    whole = train_and_evaluate(params, _sample(), tmp_path / "whole", checkpoint_every_s=1e-9)

    def crash_at_step_6(progress):
        if progress.step == 6:  # mid epoch 2; the last checkpoint is the one after step 5
            raise Crash

    with pytest.raises(Crash):
        train_and_evaluate(
            params, _sample(), tmp_path, run_id="r", on_progress=crash_at_step_6, checkpoint_every_s=1e-9
        )
    assert (tmp_path / "r" / "training_state.pt").is_file() and not (tmp_path / "r" / "metrics.json").exists()
    resumed = train_and_evaluate(params, _sample(), tmp_path, run_id="r", checkpoint_every_s=1e-9)
    assert resumed.metrics["resumed_from_step"] == 5 and whole.metrics["resumed_from_step"] is None
    assert resumed.metrics["loss_curve"] == pytest.approx(whole.metrics["loss_curve"], abs=1e-5)
    assert resumed.metrics["dev_accuracy_per_epoch"] == whole.metrics["dev_accuracy_per_epoch"]
    assert resumed.predictions == whole.predictions
    assert not (tmp_path / "r" / "training_state.pt").exists()  # deleted once the run succeeded


@pytest.mark.slow
def test_training_is_reproducible(tmp_path, tiny_params):
    params = TrainParams(**{**tiny_params, "epochs": 1, "train_limit": 16, "eval_limit": 8})
    a = train_and_evaluate(params, _sample(), tmp_path / "a")
    b = train_and_evaluate(params, _sample(), tmp_path / "b")
    assert a.metrics["loss_curve"] == b.metrics["loss_curve"]
    assert a.predictions == b.predictions


def _sample():
    from app.config import SAMPLE_DATA_DIR

    return SAMPLE_DATA_DIR


def test_length_grouped_batches_cover_every_index_once_and_group_lengths():
    lengths = [(i * 37) % 100 for i in range(200)]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(200))
    spread = statistics.mean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread < 20  # random batches of 8 would span about 78 of 100


def test_collate_pads_to_the_longest_in_batch():
    data = Encoded(input_ids=[[1, 2, 3], [4]], token_type_ids=[[0, 0, 1], [0]], labels=[1, 0])
    batch = collate(data, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_first_token_only_last_layer_gives_the_same_logits_and_gradients(attn_implementation):
    torch.manual_seed(0)
    full, fast = tiny_bert(attn_implementation), tiny_bert(attn_implementation)
    fast.load_state_dict(full.state_dict())
    assert compute_last_layer_for_first_token_only(fast)
    ids = torch.randint(1, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[3, 2:] = 0, 0  # padded rows: the mask must be sliced, not dropped
    labels = torch.tensor([0, 1, 1, 0])
    outputs = [m.train()(input_ids=ids, attention_mask=mask, labels=labels) for m in (full, fast)]
    for out in outputs:
        out.loss.backward()
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=0, atol=1e-6)
    for (name, a), b in zip(full.named_parameters(), fast.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert fast.state_dict().keys() == full.state_dict().keys()  # saved checkpoints are unchanged


def test_first_token_only_leaves_other_architectures_alone():
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=2)
    assert not compute_last_layer_for_first_token_only(DistilBertForSequenceClassification(config))


FAULTS_PER_STEP = """
import resource, statistics, sys, torch
from app.engine.memory import keep_freed_memory_in_heap

applied = keep_freed_memory_in_heap() if sys.argv[1] == "tuned" else None
x, w = torch.randn(16, 512, 16), torch.randn(16, 1536)  # a narrow inner size: the buffers matter, not the FLOPs
faults = []
for _ in range(12):  # a training-like step: a 48 MiB activation, used, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.gelu(x @ w).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults[4:]))
"""


def faults_per_step(mode: str) -> tuple[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    applied, median = proc.stdout.split()
    return applied, float(median)


def test_freed_activations_are_reused_instead_of_faulted_in_again():
    _, default = faults_per_step("default")
    applied, tuned = faults_per_step("tuned")
    assert applied == "True"
    assert default > 10_000  # glibc default: the 48 MiB buffer is mmap'd and faulted in page by page each step
    assert tuned < 1_000


def test_device_auto_is_the_cpu_without_a_gpu_and_a_missing_device_is_named():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("tpu", "gpu0"):
        with pytest.raises(DeviceNotAvailable, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceNotAvailable, match="no CUDA GPU"):
            resolve_device("cuda")


def test_minilm_alias_is_the_packaged_model():
    assert (Path(resolve_model("minilm")) / "model.safetensors").is_file()


def test_unloadable_model_offline_fails_fast_naming_the_alternatives(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailable) as exc:
        resolve_model("bert-base-multilingual-cased")
    assert "minilm" in str(exc.value) and "--model PATH" in str(exc.value)


def test_missing_local_model_folder_is_reported(tmp_path):
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))


def test_a_run_that_predicts_only_the_majority_class_is_flagged_as_learning_nothing():
    from app.engine.evaluation import classification_metrics

    labels = [1, 1, 1, 0]
    majority = classification_metrics(labels, [1, 1, 1, 1])
    assert majority["majority_baseline"] == 0.75 and majority["learned"] is False
    better = classification_metrics(labels, [1, 1, 1, 0])
    assert better["accuracy"] == 1.0 and better["learned"] is True


def test_cli_summary_warns_when_the_run_learned_nothing(tiny_run):
    from app.cli import summary

    result, _ = tiny_run
    text = summary(result)
    assert ("learned nothing" in text) == (not result.metrics["learned"])
    assert result.metrics["learned"] == (result.accuracy > result.metrics["majority_baseline"] + 0.01)


@pytest.mark.slow
def test_training_learns_a_small_slice_well_beyond_the_majority_class(tmp_path, tiny_model_dir):
    """Evaluated on the very rows it trained on, a model that learns answers them far better than always saying the
    majority answer: the check that training trains (a run that only ever predicts 'yes' fails it)."""
    from app.config import SAMPLE_DATA_DIR

    rows = [json.loads(line) for line in (SAMPLE_DATA_DIR / "train.jsonl").read_text().splitlines()]
    yes = [r for r in rows if r["label"] in (1, True)][:12]
    no = [r for r in rows if r["label"] in (0, False)][:12]
    balanced = [row for pair in zip(yes, no, strict=True) for row in pair]  # majority class: 50 %
    data = tmp_path / "slice"
    data.mkdir()
    for split in ("train.jsonl", "val.jsonl"):
        (data / split).write_text("".join(json.dumps(r) + "\n" for r in balanced))
    params = TrainParams(  # random weights: 20 epochs at a high rate to fit the 21 rows
        model=str(tiny_model_dir), batch_size=8, lr=1e-2, epochs=20, max_length=48, dev_size=0.1, seed=3
    )
    result = train_and_evaluate(params, data, tmp_path / "runs")
    assert result.metrics["majority_baseline"] == 0.5
    assert result.accuracy >= 0.85, result.metrics["loss_curve"][-10:]


@pytest.mark.slow
def test_boolq_as_a_file_of_its_own_trains_to_exactly_the_built_in_entrys_numbers(tmp_path, tiny_run, tiny_params):
    """The generic path (a JSON Lines file, its own column names, string labels, a val file) and the built-in boolq
    entry give the same loss curve, dev and val accuracy and probabilities: datasets as data moved no number."""
    from app.config import SAMPLE_DATA_DIR
    from app.engine.boolq import load_boolq
    from app.engine.data import DatasetSpec

    boolq = load_boolq(SAMPLE_DATA_DIR)
    for split, rows in (("train", boolq.train), ("val", boolq.val)):
        lines = [{"q": r.text, "p": r.text_pair, "answer": ("no", "yes")[r.label]} for r in rows]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    spec = DatasetSpec(
        name="boolq-as-file", source=str(tmp_path / "train.jsonl"), val_source=str(tmp_path / "val.jsonl"),
        format="jsonl", text_column="q", text_pair_column="p", label_column="answer",
    )  # fmt: skip
    generic = train_and_evaluate(TrainParams(**tiny_params), spec, tmp_path / "runs")
    builtin, _ = tiny_run  # the same parameters on the built-in entry
    assert generic.metrics["label_names"] == builtin.metrics["label_names"] == ["no", "yes"]
    assert generic.metrics["loss_curve"] == pytest.approx(builtin.metrics["loss_curve"], abs=1e-6)
    assert generic.metrics["dev_accuracy_per_epoch"] == builtin.metrics["dev_accuracy_per_epoch"]
    assert generic.accuracy == builtin.accuracy and generic.predictions == builtin.predictions


def test_layer_wise_lr_decay_gives_each_block_its_lr_and_decay_1_keeps_one_group():
    from app.engine.training import make_optimizer

    model = tiny_bert()  # 3 blocks: embeddings at lr * 0.5**4, block i at lr * 0.5**(3 - i), head at lr
    optimizer = make_optimizer(model, TrainParams(lr=1e-3, layer_lr_decay=0.5, weight_decay=0.05), fused=False)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)
    assert lr_of[id(named["classifier.weight"])] == lr_of[id(named["bert.pooler.dense.weight"])] == 1e-3
    assert lr_of[id(named["bert.encoder.layer.2.output.dense.weight"])] == 1e-3 * 0.5
    assert lr_of[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == 1e-3 * 0.5**3
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])] == 1e-3 * 0.5**4
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.05}
    plain = make_optimizer(model, TrainParams(lr=1e-3), fused=False)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.01  # torch's default, as before
