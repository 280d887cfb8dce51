"""Backend expressions: TorchPipe-compatible parsing and every error case."""
from __future__ import annotations

import pytest

from trtserve.expression import Expr, ExpressionError, parse, resolve
from trtserve.errors import ConfigError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Identity", Expr("Identity")),
        ("SyncTensor[TensorrtTensor]", Expr("SyncTensor", (Expr("TensorrtTensor", (), 11),))),
        (
            "S[A,B[C]]",
            Expr("S", (Expr("A", (), 2), Expr("B", (Expr("C", (), 6),), 4))),
        ),
        (" S [ A , B ] ", Expr("S", (Expr("A", (), 5), Expr("B", (), 9)), 1)),
    ],
)
def test_parse(text, expected):
    assert parse(text) == expected


def test_round_trip_of_torchpipe_strings():
    for text in [
        "S[DecodeMat,ResizeMat,CvtColorMat]",
        "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor]",
        "Sequential[A,B[C[D,E]],F]",
    ]:
        assert str(parse(text)) == text


@pytest.mark.parametrize(
    "text, position, fragment",
    [
        ("", 0, "expected a backend name, found end of string"),
        ("   ", 3, "expected a backend name"),
        ("[A]", 0, "expected a backend name, found '['"),
        ("A[", 2, "expected a backend name, found end of string"),
        ("A[B", 1, "unbalanced '[' opened at position 1"),
        ("S[A,B[C]", 1, "unbalanced '['"),
        ("A]", 1, "unbalanced ']'"),
        ("A[B]]", 4, "unbalanced ']'"),
        ("A[]", 2, "expected a backend name, found ']'"),
        ("A[,B]", 2, "expected a backend name, found ','"),
        ("A[B,]", 4, "expected a backend name, found ']'"),
        ("A B", 2, "unexpected 'B'"),
        ("A-B", 1, "unexpected '-'"),
        ("A[B C]", 4, "expected ',' or ']', found 'C'"),
        ("1A", 0, "not a valid backend name"),
    ],
)
def test_syntax_errors_name_the_position(text, position, fragment):
    with pytest.raises(ExpressionError) as info:
        parse(text)
    assert info.value.details["position"] == position
    assert fragment in info.value.message
    assert isinstance(info.value, ConfigError)


def test_non_string_expression():
    with pytest.raises(ExpressionError, match="must be a string"):
        parse(3)


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ExpressionError) as info:
        resolve(parse("S[DecodeMat,ResizMat]"))
    assert "unknown backend 'ResizMat' at position 12" in info.value.message
    assert "did you mean 'ResizeMat'?" in info.value.message


def test_unknown_name_is_case_insensitive_in_suggestions():
    with pytest.raises(ExpressionError, match="did you mean 'Identity'"):
        resolve(parse("identity"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("Identity[Identity]", "does not wrap other backends"),
        ("S", "needs at least one inner backend"),
        ("Sequential", "needs at least one inner backend"),
    ],
)
def test_arity_errors(text, fragment):
    with pytest.raises(ExpressionError, match=fragment):
        resolve(parse(text))


def test_wrapper_arity_is_exact():
    import trtserve

    class Wrap(trtserve.Backend):
        children_arity = 1

    trtserve.register("WrapOne", Wrap)
    resolve(parse("WrapOne[Identity]"))
    with pytest.raises(ExpressionError, match="wraps exactly 1 backend"):
        resolve(parse("WrapOne[Identity,Identity]"))
