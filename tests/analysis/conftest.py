import pytest

import moec
from moec.frontend.zoo import build_preset


@pytest.fixture(scope="session")
def compiled_olmoe():
    model, example = build_preset("tiny-olmoe")
    program = moec.compile(model, example).program
    return program, program.flatten_inputs((), example)
