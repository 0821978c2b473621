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
        TrainParams(learning_rate=1e-5)
    assert exc.value.errors()[0]["type"] == "extra_forbidden"
