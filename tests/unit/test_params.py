import pytest
from pydantic import ValidationError

from app.params import TrainParams


def test_defaults_match_the_seed():
    p = TrainParams()
    assert (p.batch_size, p.lr, p.eps, p.epochs) == (32, 5e-5, 1e-8, 2)
    assert p.model == "bert-base-multilingual-cased"
    assert (p.max_length, p.dev_size, p.seed, p.warmup_ratio) == (256, 0.1, 42, 0.0)
    assert p.train_limit is None and p.eval_limit is None


@pytest.mark.parametrize(
    "field, ok, bad",
    [
        ("batch_size", [1, 512], [0, 513]),
        ("lr", [1e-9, 1], [0, -1e-5, 1.01]),
        ("eps", [1e-12, 1e-2], [0, 0.011]),
        ("epochs", [1, 100], [0, 101]),
        ("max_length", [16, 512], [15, 513]),
        ("dev_size", [0.01, 0.49], [0, 0.5]),
        ("train_limit", [1, None], [0]),
        ("eval_limit", [1, None], [0]),
        ("warmup_ratio", [0, 0.5], [-0.1, 0.51]),
    ],
)
def test_each_bound(field, ok, bad):
    for value in ok:
        assert getattr(TrainParams(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(ValidationError) as exc:
            TrainParams(**{field: value})
        assert exc.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("field", ["batch_size", "epochs", "max_length", "seed", "train_limit"])
def test_booleans_and_strings_are_not_integers(field):
    for value in (True, "32", 3.5):
        with pytest.raises(ValidationError):
            TrainParams(**{field: value})


def test_keep_best_epoch_is_a_strict_boolean_off_by_default():
    assert TrainParams().keep_best_epoch is False
    assert TrainParams(keep_best_epoch=True).keep_best_epoch is True
    for value in ("true", 1):
        with pytest.raises(ValidationError) as exc:
            TrainParams(keep_best_epoch=value)
        assert exc.value.errors()[0]["loc"] == ("keep_best_epoch",)


def test_floats_accept_ints_but_not_strings_or_booleans():
    assert TrainParams(lr=1).lr == 1
    for value in ("5e-5", True):
        with pytest.raises(ValidationError):
            TrainParams(lr=value)


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError) as exc:
        TrainParams(label_smoothing=0.1)
    assert exc.value.errors()[0]["type"] == "extra_forbidden"


def test_hugging_face_names_stand_for_ours_and_jobs_record_ours():
    params = TrainParams.model_validate({"learning_rate": 1e-4, "num_train_epochs": 3, "max_seq_length": 128})
    assert (params.lr, params.epochs, params.max_length) == (1e-4, 3, 128)
    assert not {"learning_rate", "num_train_epochs", "max_seq_length"} & set(params.model_dump())


def test_per_device_train_batch_size_counts_one_devices_examples_as_in_training_arguments():
    assert TrainParams.model_validate({"per_device_train_batch_size": 8, "devices": 4}).batch_size == 32
    assert TrainParams.model_validate({"per_device_train_batch_size": 8}).batch_size == 8
    agreeing = {"per_device_train_batch_size": 8, "devices": 4, "batch_size": 32}
    assert TrainParams.model_validate(agreeing).batch_size == 32
    given_as_strings = {"per_device_train_batch_size": "8", "devices": "4", "learning_rate": "1e-4"}  # the CLI's way
    assert TrainParams.model_validate_strings(given_as_strings).model_dump(include={"batch_size", "lr"}) == {
        "batch_size": 32,
        "lr": 1e-4,
    }


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"lr": 1e-4}, {"learning_rate": 2e-4}),
        ({"epochs": 2}, {"num_train_epochs": 3}),
        ({"max_length": 128}, {"max_seq_length": 256}),
        ({"batch_size": 32, "devices": 2}, {"per_device_train_batch_size": 32}),  # 32 per device is 64 per step
    ],
)
def test_a_field_and_its_hugging_face_name_with_different_values_is_an_error_naming_both(ours, theirs):
    name, alias = next(iter(ours)), next(iter(theirs))
    with pytest.raises(ValidationError) as exc:
        TrainParams.model_validate(ours | theirs)
    errors = {error["loc"]: error["msg"] for error in exc.value.errors()}
    assert set(errors) == {(name,), (alias,)}
    assert all(name in message and alias in message for message in errors.values())


def test_a_field_and_its_hugging_face_name_with_one_value_are_accepted():
    assert TrainParams.model_validate({"lr": 1, "learning_rate": 1.0}).lr == 1.0


def test_an_invalid_value_under_a_hugging_face_name_is_named_as_given():
    given = {"learning_rate": 0, "max_seq_length": "long", "per_device_train_batch_size": 300, "devices": 2}
    with pytest.raises(ValidationError) as exc:
        TrainParams.model_validate(given)
    errors = {error["loc"]: error["msg"] for error in exc.value.errors()}
    assert set(errors) == {("learning_rate",), ("max_seq_length",), ("per_device_train_batch_size",)}
    assert "512" in errors[("per_device_train_batch_size",)] and "600" in errors[("per_device_train_batch_size",)]
